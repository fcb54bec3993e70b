"""Install the torchvision build that matches the installed torch: `python -m automodel.install_torchvision`.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors hold a video processor, and transformers builds video processors only
with torchvision. A plain `pip install torchvision` takes PyPI's build, made for PyPI's (CUDA) torch: beside a CPU
or another CUDA build it either fails at import ("operator torchvision::nms does not exist") or makes pip replace
torch with a several-GB CUDA build. Each torch release has exactly one torchvision release (2.13 -> 0.28, 2.14 ->
0.29, the same patch number), and PyTorch's index publishes it for every build variant under the variant's local
tag (`+cpu`, `+cu128`, `+rocm6.4`); pinning torch to the installed build leaves torch as it is, and the import is
checked afterwards (a torchvision that does not import is uninstalled again, so transformers keeps working).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

PYTORCH_INDEX = "https://download.pytorch.org/whl"
# torchvision 0.{minor + 15} goes with torch 2.{minor} since torch 2.0; the patch numbers agree from torch 2.1 on
MINOR_OFFSET = 15


class Refused(Exception):
    """One line for the user: what cannot be installed and what would work."""


def plan(torch_version: str, index: str | None = None) -> tuple[list[str], str | None]:
    """(the requirements to install, the extra index that holds them) for this torch build."""
    m = re.fullmatch(r"2\.(\d+)\.(\d+)(?:\+([A-Za-z0-9.]+))?", torch_version)
    if m is None:
        raise Refused(f"torch {torch_version} is not a release build (a nightly or a source build): install the "
                      "torchvision built with it from the same place (for a nightly, PyTorch's nightly index)")
    minor, patch, variant = int(m.group(1)), int(m.group(2)), m.group(3)
    public = torch_version.split("+")[0]  # the installed build satisfies it; a cap such as torch<=2.14.1 admits it
    if minor < 6:
        raise Refused(f"torch {torch_version} is older than automodel supports (torch>=2.6); upgrade torch first")
    # a CPU torch needs the +cpu build; PyPI's torch is a CUDA build (2.14.1+cu130) whose torchvision PyPI holds
    # untagged, and the index's tagged one ranks above it where both can be seen
    local = "+cpu" if variant == "cpu" else ""
    wanted = [f"torchvision==0.{minor + MINOR_OFFSET}.{patch}{local}", f"torch=={public}"]
    if index is None and variant:
        index = f"{PYTORCH_INDEX}/{variant}"
    return wanted, index


def pip_command(wanted: list[str], index: str | None) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *wanted]
    return command + (["--extra-index-url", index] if index else [])


IMPORT_CHECK = ("import torch, torchvision, torchvision.transforms.v2.functional; from torchvision.ops import nms; "
                "print(torch.__version__, torchvision.__version__)")


def imports() -> tuple[bool, str]:
    """Whether torchvision imports beside this torch (in a fresh interpreter), and what it printed."""
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True)
    text = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    return done.returncode == 0, (text[-1] if text else "")


def _why(stderr: str, index: str | None) -> str:
    errors = [line for line in stderr.strip().splitlines() if line.startswith("ERROR")] or ["pip failed"]
    unreachable = index and ("Failed to establish a new connection" in stderr or "Name or service not known" in stderr)
    return errors[0][:200] + (f"; {index} could not be reached" if unreachable else "")


def install(index: str | None = None, dry_run: bool = False) -> str:
    """Install (or, dry, print) the matching torchvision; what was done, in one line."""
    import torch

    before = torch.__version__
    wanted, index = plan(before, index)
    command = pip_command(wanted, index)
    if dry_run:
        return " ".join(command)
    ok, _ = imports()
    if ok:
        return f"torchvision already imports beside torch {before}; nothing to do"
    print(f"automodel: installing {wanted[0]} for torch {before}" + (f" from {index}" if index else ""), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise Refused(f"pip could not install {wanted[0]}" + (f" from {index}" if index else "") +
                      f" ({_why(done.stderr, index)}); pass --index with a mirror that holds that build, or install "
                      "torch and torchvision together from one place")
    ok, said = imports()
    if not ok:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], capture_output=True)
        raise Refused(f"{wanted[0]} was installed but does not import beside torch {before} ({said[:200]}); it was "
                      "uninstalled again, so transformers keeps working without it")
    return f"torchvision installed: torch and torchvision {said}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m automodel.install_torchvision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", metavar="URL",
                        help=f"the index that holds the build (default: {PYTORCH_INDEX}/<variant> for a torch with a "
                             "local tag such as +cpu, the configured index otherwise)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    args = parser.parse_args(argv)
    try:
        print(install(args.index, args.dry_run))
    except Refused as e:
        print(f"automodel: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
