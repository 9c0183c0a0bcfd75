"""What the Slicer ExtensionsIndex's description checker (scripts/check_description_files.py)
checks, done offline against this repository: a license file at the root, the top-level
CMakeLists.txt's project() name against the description file's name, icon and screenshot URLs
that are http(s) and resolve to image files in this repository, a known category, the SCM URL's
syntax and repository name, and dependencies that the description file and CMake agree on.
Downloads cannot be checked here; each URL is mapped back to the file it must serve."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP_CMAKE = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
INDEX_JSON = ROOT / "Resources" / "CorrReg.json"
ENTRY = json.loads(INDEX_JSON.read_text(encoding="utf-8"))
# A subset of the checker's ACCEPTED_EXTENSION_CATEGORIES, enough to hold ours.
KNOWN_CATEGORIES = {"Registration", "IGT", "Segmentation", "Utilities", "Quantification", "Planning"}
LICENSE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]


def _cmake_set(variable: str) -> str:
    m = re.search(r'set\s*\(' + variable + r'\s*"([^"]*)"\s*\)', TOP_CMAKE, re.IGNORECASE)
    assert m, f"{variable} is not set in CMakeLists.txt"
    return m.group(1)


def _repository():
    """(owner, name) of the repository the index entry points to."""
    path = urllib.parse.urlsplit(ENTRY["scm_url"]).path.strip("/")
    owner, name = path.split("/")[:2]
    return owner, re.sub(r"\.git$", "", name)


def _tracked(path: str) -> bool:
    out = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    return out.returncode == 0 or not (ROOT / ".git").exists() and (ROOT / path).is_file()


def _repository_file(url: str) -> Path:
    """The file in this repository that a raw.githubusercontent.com URL of the entry serves."""
    owner, name = _repository()
    prefix = f"https://raw.githubusercontent.com/{owner}/{name}/{ENTRY['scm_revision']}/"
    assert url.startswith(prefix), f"{url} is not a file of {owner}/{name} at {ENTRY['scm_revision']} ({prefix}...)"
    rel = url[len(prefix):]
    assert (ROOT / rel).is_file(), f"{url}: {rel} does not exist in the repository"
    assert _tracked(rel), f"{url}: {rel} exists but is not committed"
    return ROOT / rel


def _is_image(path: Path) -> bool:
    head = path.read_bytes()[:8]
    return head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8") or head.startswith(b"GIF8")


def test_license_file_at_the_root_matches_the_package_license():
    found = [n for n in LICENSE_NAMES if (ROOT / n).is_file()]
    assert found, "check_license_file: no license file found in repository root"
    text = (ROOT / found[0]).read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_project_name_matches_the_description_file():
    names = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", TOP_CMAKE, re.IGNORECASE)
    assert names and names[0].strip("\"'") == INDEX_JSON.stem == "CorrReg"


def test_cmake_minimum_is_the_template_s():
    m = re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+([0-9.]+)", TOP_CMAKE)
    assert m and tuple(int(x) for x in m.group(1).split(".")[:2]) >= (3, 28), "the 5.12 template asks for 3.28"


def test_icon_and_screenshot_urls_resolve_to_images_in_the_repository():
    icon = _cmake_set("EXTENSION_ICONURL")
    assert icon.startswith("http")
    assert _is_image(_repository_file(icon))
    shots = _cmake_set("EXTENSION_SCREENSHOTURLS").split()
    assert shots, "No EXTENSION_SCREENSHOTURLS found in CMakeLists.txt."
    for url in shots:
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif"))
        path = _repository_file(url)
        assert _is_image(path) and path.stat().st_size > 10_000, f"{path} is not a real screenshot"


def test_homepage_is_the_readme_section_of_the_same_repository():
    owner, name = _repository()
    url = _cmake_set("EXTENSION_HOMEPAGE")
    base, _, anchor = url.partition("#")
    assert base == f"https://github.com/{owner}/{name}", url
    headings = [re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)]
    assert anchor in headings, f"the README has no section #{anchor}"


def test_category_scm_and_dependencies():
    assert ENTRY["category"] in KNOWN_CATEGORIES
    assert _cmake_set("EXTENSION_CATEGORY") == ENTRY["category"]
    split = urllib.parse.urlsplit(ENTRY["scm_url"])
    assert "://" in ENTRY["scm_url"] and split.scheme in ("git", "https")
    assert "slicer" in _repository()[1].lower(), "check_git_repository_name wants 'Slicer' in the repository name"
    depends = _cmake_set("EXTENSION_DEPENDS").split()
    assert sorted(depends) == sorted(ENTRY.get("build_dependencies", []))


def test_contributors_read_firstname_lastname_organization():
    contributors = [c.strip() for c in _cmake_set("EXTENSION_CONTRIBUTORS").split(",")]
    assert contributors and all(re.fullmatch(r"[A-Z][\w.'-]* [\w .'-]+ \([^)]+\)", c) for c in contributors), contributors
