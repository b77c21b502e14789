"""The documentation: the site builds with warnings as errors, and the README is a front door whose
links lead somewhere."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values():
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_documentation_site_builds_with_warnings_as_errors(tmp_path):
    """A broken link, a missing page, a docstring mkdocstrings cannot render or a README snippet that
    is gone fails the build (strict)."""
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
                           capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages = nav_pages(config["nav"])
    assert sorted(pages) == sorted(p.name for p in (REPO / "docs").glob("*.md")), "a page of docs/ is not in the site's nav"
    for page in pages:
        html = site / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert html.is_file(), page
    front = (site / "index.html").read_text()  # the README's install, quickstart and tests, as snippets
    assert "quickstart.yaml" in front and "CURE_HUB_CIFAR10" in front
    api = (site / "api" / "index.html").read_text()
    assert all(name in api for name in ("load_robust_model", "RobustClassifier", "TrainConfig", "push_to_hub"))


def test_the_readme_is_a_front_door_whose_links_lead_somewhere():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
