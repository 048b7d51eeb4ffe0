"""The mask cache: mask PNGs of the expensive extractors, by photo and extractor settings.

A cached mask is named by a :class:`CachedMask` (the photo's sha256, the extractor and a hash
of its settings). :class:`MaskCache` reads and writes them through any get/put pair: the
pipeline's is over the artifact store, whose key for it is made in the store's key module;
:meth:`MaskCache.in_folder` keeps them in a local folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CachedMask:
    """What a cached mask is the mask of: a photo's content, an extractor, its settings."""

    image_sha: str
    extractor: str
    settings_digest: str

    @property
    def file_name(self) -> str:
        return f"{self.extractor}-{self.settings_digest}.png"


@dataclass(frozen=True)
class MaskCache:
    """Mask PNG bytes by :class:`CachedMask`: a get (None when absent) and a put."""

    get: Callable[[CachedMask], bytes | None]
    put: Callable[[CachedMask, bytes], None]

    @classmethod
    def in_folder(cls, root: str | Path) -> MaskCache:
        """A cache in a local folder (``{image_sha}/{extractor}-{settings}.png``); writes are
        atomic renames."""
        root = Path(root)

        def get(name: CachedMask) -> bytes | None:
            path = root / name.image_sha / name.file_name
            return path.read_bytes() if path.is_file() else None

        def put(name: CachedMask, data: bytes) -> None:
            path = root / name.image_sha / name.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)

        return cls(get=get, put=put)
