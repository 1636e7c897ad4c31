"""mkdocs hook (placeholder)."""
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]

def mirror_package():
    mirror = ROOT / "build" / "docs_api_src" / "dfm_ext"
    mirror.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "src" / "dfm_ext").iterdir() if p.name != "__pycache__"}
    wanted |= {"adapters": ROOT / "adapters", "recipes": ROOT / "recipes"}
    for link in mirror.iterdir():
        if link.name not in wanted or link.resolve() != wanted[link.name]:
            link.unlink()
    for name, target in wanted.items():
        if not (mirror / name).is_symlink():
            (mirror / name).symlink_to(target)
mirror_package()
