"""Evaluation: Y-channel PSNR/SSIM under a named protocol (tadm's, pyiqa's or BasicSR's), LPIPS/DISTS, FID
and KID, and the engine behind ``tadm evaluate`` that scores any method (an HR -> HR function) on any images
and writes the paper-style report.

Decoupled from the model: may import the data layer and the bottom layer only.
"""
