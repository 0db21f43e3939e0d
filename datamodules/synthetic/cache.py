"""Where demo datasets live, and writing one exactly once (atomically, safe against concurrent ranks)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mmclin.errors import ConfigError

DONE_MARKER = ".complete"  # written last: a directory without it is not a finished demo


def demo_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else ``$MMCLIN_CACHE``, else ``~/.cache/mmclin``."""
    return Path(cache_dir or os.environ.get("MMCLIN_CACHE", Path.home() / ".cache" / "mmclin"))


def build_once(out_dir: str | os.PathLike, settings: dict, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temporary directory beside `out_dir`, then move it into place atomically.

    A finished `out_dir` made with the same `settings` is reused; one made with other settings is refused
    (ValueError), as is a non-demo directory in the way (FileExistsError). If another process finishes first,
    its result is kept and ours discarded.
    """
    out = Path(out_dir)
    marker = out / DONE_MARKER
    if marker.exists():
        try:
            found = json.loads(marker.read_text())
        except json.JSONDecodeError:
            found = marker.read_text().strip()
        if found != settings:
            raise ConfigError(f"{out} holds a demo made with {found}; asked for {settings}. Use another directory.")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        write(tmp)
        (tmp / DONE_MARKER).write_text(json.dumps(settings))
        try:
            os.replace(tmp, out)
        except OSError as err:  # another process finished first, or a directory of the user's is in the way
            if not marker.exists():
                raise FileExistsError(f"{out} exists and is not a finished demo (no {DONE_MARKER} file); remove "
                                      "it or choose another directory") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
