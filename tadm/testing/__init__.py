"""tadm's public test kit: random-weight twins of the backbones, stand-ins for downloaded loss networks,
and contract checks any rescaler, backbone or aligner (built-in or third-party) can run in one line.

Production code never imports this package; it may import every other part of tadm.
"""
