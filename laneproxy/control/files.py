"""The file source: swimlane manifests and endpoints files on disk -> RouteTables in the store.

Owns reading the files (off the event loop), noticing changes (polling modification time, size
and inode, which also sees Kubernetes ConfigMap symlink swaps), and publishing. A change that does
not validate is logged with every problem, counted, and leaves the running table in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from laneproxy.control.building import build_off_loop, settle_heap
from laneproxy.core.build import Built, ConfigDocument, build, content_version, parse_yaml
from laneproxy.core.errors import ConfigInvalidError, ConfigProblem
from laneproxy.core.store import RouteTableStore

log = logging.getLogger("laneproxy.config")


def load_files(paths: list[str] | tuple[str, ...], *, namespace: str, lenient: bool = False) -> Built:
    """Read, parse and build in one go; raises ConfigInvalidError naming every problem in every file.

    Unknown fields are problems unless `lenient`, which makes them warnings of the result.
    """
    texts: list[str] = []
    documents: list[ConfigDocument] = []
    problems: list[ConfigProblem] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(ConfigProblem(path, "file", f"cannot read: {getattr(exc, 'strerror', None) or exc}"))
            continue
        texts.append(text)
        try:
            documents.extend(parse_yaml(path, text))
        except ConfigInvalidError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigInvalidError(problems)
    return build(documents, version=content_version(texts), namespace=namespace, lenient=lenient, sources=paths)


def _fingerprint(paths: tuple[str, ...]) -> tuple:
    marks = []
    for path in paths:
        try:
            st = os.stat(path)
            marks.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            marks.append(None)
    return tuple(marks)


class FileSource:
    """Publishes a table built from `paths` now and whenever one of them changes."""

    def __init__(self, paths: tuple[str, ...], store: RouteTableStore, *, namespace: str, interval: float,
                 lenient: bool = False) -> None:
        self.paths = paths
        self.store = store
        self.namespace = namespace
        self.lenient = lenient
        self.interval = interval
        self._seen: tuple | None = None
        self._task: asyncio.Task | None = None

    async def load_once(self) -> bool:
        """Build from the files as they are now; True if a new table was published."""
        self._seen = await asyncio.to_thread(_fingerprint, self.paths)
        try:
            built = await build_off_loop(lambda: load_files(self.paths, namespace=self.namespace, lenient=self.lenient))
        except ConfigInvalidError as exc:
            self.store.reject(exc)
            log.error("configuration rejected, keeping version %r:\n%s", self.store.current.version or "none", exc)
            return False
        table = built.table
        if table.version == self.store.current.version:
            return False
        for warning in built.warnings:
            log.warning("%s (ignored: --lenient)", warning)
        for notice in built.notices:
            log.info("%s", notice)
        self.store.publish(table)
        settle_heap()
        log.info("configuration version %s published (%d services, %d groups)", table.version,
                 len(table.services), len(table.groups))
        return True

    async def start(self) -> None:
        await self.load_once()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="file-source")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            fingerprint = await asyncio.to_thread(_fingerprint, self.paths)
            if fingerprint != self._seen:
                await self.load_once()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
