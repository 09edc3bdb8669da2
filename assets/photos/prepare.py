"""Rebuild assets/photos/ from Debian bookworm's wallpaper packages (the files shipped here are its output).

    python assets/photos/prepare.py [--debs DIR]   # needs apt-get and dpkg-deb (Debian / Ubuntu)

Why these: they are real photographs of 2 to 25 MP under free licences (CC0, CC-BY, CC-BY-SA, GPL-2+,
LGPL-3), each file's author and licence recorded by Debian, and reachable wherever Debian's mirrors are.
Held-out photos are resized to 2048 px on the long side (>= 2 MP), training photos to 1024 px, both with
Pillow's Lanczos filter, and saved as JPEG quality 92 without chroma subsampling. LICENSES.md lists each
file's source, author, licence and the change made.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
LOMIRI16 = ("lomiri-wallpapers-16.04", "usr/share/backgrounds")
LOMIRI20 = ("lomiri-wallpapers-20.04", "usr/share/backgrounds")
MATE = ("mate-backgrounds", "usr/share/backgrounds/mate/nature")
PLASMA = ("plasma-workspace-wallpapers", "usr/share/wallpapers")

# (output name, split, (package, folder), file inside that folder)
PHOTOS: list[tuple[str, str, tuple[str, str], str]] = [
    # held out: never trained on
    ("picos_de_europa", "heldout", LOMIRI16, "picosdeeuropa_by_Aitzol_Berasategi.jpg"),
    ("boats_evening", "heldout", PLASMA, "EveningGlow/contents/images/2560x1600.jpg"),
    ("dogs_window", "heldout", LOMIRI16, "friends_by_Aitzol_Berasategi.jpg"),
    ("nuthatch", "heldout", LOMIRI20, "Kleiber_by_Lukas_Baubkus.jpg"),
    ("facade_grey", "heldout", PLASMA, "Grey/contents/images/2560x1600.jpg"),
    ("bridge_cables", "heldout", LOMIRI16, "Bridge_by_Sander_Klootwijk.jpg"),
    ("lake_night", "heldout", PLASMA, "DarkestHour/contents/images/2560x1600.jpg"),
    ("storm_road", "heldout", MATE, "Storm.jpg"),
    ("lake_dusk", "heldout", PLASMA, "summer_1am/contents/images/2560x1600.jpg"),
    ("pier_fog", "heldout", PLASMA, "ColdRipple/contents/images/2560x1600.jpg"),
    ("treetops", "heldout", PLASMA, "OneStandsOut/contents/images/2560x1600.jpg"),
    ("leaves_sky", "heldout", LOMIRI16, "Dragonfly_by_Bolly.jpg"),
    ("leaf_drops", "heldout", MATE, "RainDrops.jpg"),
    ("forest_path", "heldout", PLASMA, "Path/contents/images/2560x1600.jpg"),
    ("marigold", "heldout", MATE, "Garden.jpg"),
    ("ladybird_flowers", "heldout", MATE, "LadyBird.jpg"),
    ("cups", "heldout", PLASMA, "ColorfulCups/contents/images/2560x1600.jpg"),
    ("fig_bowl", "heldout", LOMIRI16, "Picture_0B_by_freespace.jpg"),
    ("water_drop", "heldout", MATE, "Aqua.jpg"),
    ("shore_aerial", "heldout", PLASMA, "Volna/contents/images/5120x2880.jpg"),
    ("wine_room", "heldout", LOMIRI16, "Wine_by_Jakkub_Mede.jpg"),
    ("clock", "heldout", LOMIRI16, "greentock_by_Peter_Nerlich.jpg"),
    ("wood_grain", "heldout", MATE, "Wood.jpg"),
    ("kite_sky", "heldout", PLASMA, "Kite/contents/images/2560x1600.jpg"),
    # training
    ("autumn_valley", "train", LOMIRI16, "aitzgorri_by_Aitzol_Berasategi.jpg"),
    ("sunset_plateau", "train", LOMIRI16, "sunset_by_Aitzol_Berasategi.jpg"),
    ("lamp_bird", "train", LOMIRI16, "free_by_Peter_Nerlich.jpg"),
    ("pier_lake", "train", PLASMA, "BytheWater/contents/images/2560x1600.jpg"),
    ("milky_way_sea", "train", LOMIRI20, "Infinite-Sea_by_Aury88.jpg"),
    ("leaf_veins", "train", MATE, "Blinds.jpg"),
    ("meadow", "train", MATE, "GreenMeadow.jpg"),
    ("stream", "train", LOMIRI16, "life_by_Aitzol_Berasategi.jpg"),
    ("sunflower", "train", MATE, "YellowFlower.jpg"),
    ("orange_flower", "train", MATE, "FreshFlower.jpg"),
    ("dandelion_seed", "train", MATE, "TwoWings.jpg"),
    ("brushes", "train", LOMIRI16, "Picture_1A_by_freespace.jpg"),
    ("dandelions", "train", LOMIRI16, "seeding_by_Clements_Engelhardt.jpg"),
    ("dune_grass", "train", MATE, "Dune.jpg"),
    ("fallen_leaf", "train", PLASMA, "FallenLeaf/contents/images/2560x1600.jpg"),
]
LONG_SIDE = {"heldout": 2048, "train": 1024}


def unpack(package: str, debs: Path) -> Path:
    """The package's files, downloaded with apt-get and unpacked once into ``debs``."""
    root = debs / package
    if not root.is_dir():
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        (deb,) = debs.glob(f"{package}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--debs", type=Path, default=None, help="where to download and unpack the packages")
    args = ap.parse_args()
    debs = args.debs or Path(tempfile.mkdtemp(prefix="tadm-photos-"))
    debs.mkdir(parents=True, exist_ok=True)
    for name, split, (package, folder), file in PHOTOS:
        src = unpack(package, debs) / folder / file
        im = Image.open(src).convert("RGB")
        scale = LONG_SIDE[split] / max(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        out = HERE / split / f"{name}.jpg"
        out.parent.mkdir(exist_ok=True)
        im.save(out, quality=92, subsampling=0)
        print(f"{out.relative_to(HERE)}: {im.width}x{im.height} from {package} {folder}/{file}")


if __name__ == "__main__":
    main()
