"""A read-only memory map of a checkpoint file (safetensors shard or GGUF) that can hand pages
back: the loaders read one tensor at a time through it and release its pages once the tensor
is quantized, which keeps peak RSS near the final state whatever the checkpoint's size."""
from __future__ import annotations

import mmap


class MappedFile:
    """Subclasses open `self._f` (binary, read), set `self._mm` (an ACCESS_READ mmap of it, or
    None for an empty file), `self.path` and `self.tensors` ({name: the format's record of
    one tensor}) in their constructor."""

    _f = None
    _mm = None

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def info(self, name):
        """The format's record of tensor `name`; KeyError naming the file if it has none."""
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _drop(self, begin: int, length: int) -> None:
        """Hint that bytes [begin, begin + length) are not needed again (the page cache keeps
        them; this process's RSS drops)."""
        if self._mm is None or length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = begin - begin % mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, min(length + (begin - start), len(self._mm) - start))

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # an array viewing the map is still alive; the map closes when it is collected
                pass
            self._mm = None
        if self._f is not None:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
