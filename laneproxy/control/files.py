"""The file source: swimlane manifests and endpoints files on disk -> RouteTables in the store.

Owns reading the files (off the event loop), noticing changes (polling modification time, size
and inode, which also sees Kubernetes ConfigMap symlink swaps), and publishing. A file whose change
does not validate keeps its last good version while the other files still update: the problems are
logged, the update is counted as rejected (`laneproxy.config.update_rejected`), the file as left out
(`laneproxy.config.skipped_objects`). Where even that cannot be built (a file bad from the start,
or a last good version the other files no longer agree with) the running table stays as it is.
A changed file whose documents read cleanly, while every file is at its current version, is applied
to the running table by core.incremental (only the services whose declarations changed are built
again); the file is still read and parsed whole, off the event loop. Anything else is a full load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Mapping

from laneproxy.control.building import build_off_loop, settle_heap
from laneproxy.core.build import Built, ConfigDocument, build, build_skipping, content_version, parse_yaml
from laneproxy.core.errors import ConfigInvalidError, ConfigProblem
from laneproxy.core.incremental import IncrementalTable
from laneproxy.core.store import RouteTableStore, SourceHealth

# A file's text and documents, as last built into a published table.
FileVersion = tuple[str, tuple[ConfigDocument, ...]]

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


def load_files_keeping(paths: tuple[str, ...], *, namespace: str, lenient: bool,
                       last_good: Mapping[str, FileVersion]) -> tuple[Built, dict[str, FileVersion]]:
    """load_files, but a file that does not read, parse or validate is replaced by its last good version.

    Returns the table and each file's version in it; `Built.skipped` names the files kept at their last
    good version, with the problems of their new one. Raises ConfigInvalidError like load_files where a
    bad file has no last good version, or the last good versions do not build either.
    """
    current: dict[str, FileVersion] = {}
    kept: dict[str, list[ConfigProblem]] = {}
    problems: list[ConfigProblem] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
            current[path] = (text, tuple(parse_yaml(path, text)))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            found = [ConfigProblem(path, "file", f"cannot read: {getattr(exc, 'strerror', None) or exc}")]
        except ConfigInvalidError as exc:
            found = list(exc.problems)
        if path in last_good:
            current[path] = last_good[path]
            kept[path] = found
        else:
            problems.extend(found)
    if problems:
        raise ConfigInvalidError(problems)
    documents = [doc for path in paths for doc in current[path][1]]
    built = build_skipping(documents, version="", namespace=namespace, lenient=lenient, sources=paths, drop=False,
                           last_good={path: version[1] for path, version in last_good.items() if path not in kept})
    for path, found in built.skipped.items():  # without drop, every one of them is at its last good version
        current[path] = last_good[path]
        kept[path] = found
    version = content_version(current[path][0] for path in paths)
    table = dataclasses.replace(built.table, version=version)
    return dataclasses.replace(built, table=table, skipped={path: tuple(kept[path]) for path in sorted(kept)}), current


def read_changed(paths: tuple[str, ...], last_good: Mapping[str, FileVersion]) -> dict[str, FileVersion] | None:
    """The files whose text differs from their version in the running table, parsed.

    None where one cannot be read or parsed: the full load decides what to keep for it.
    """
    changed: dict[str, FileVersion] = {}
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if path in last_good and last_good[path][0] == text:
            continue
        try:
            changed[path] = (text, tuple(parse_yaml(path, text)))
        except ConfigInvalidError:
            return None
    return changed


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
                 lenient: bool = False, stale_after: float = 180.0) -> None:
        self.paths = paths
        self.store = store
        self.namespace = namespace
        self.lenient = lenient
        self.interval = interval
        self.stale_after = stale_after  # a table behind its files this long: laneproxy.config.table_stale
        self._seen: tuple | None = None
        self._task: asyncio.Task | None = None
        self._last_good: dict[str, FileVersion] = {}
        # The running table's indexes: a changed file replaces only the services its documents touch.
        self._incremental: IncrementalTable | None = None
        self.incremental_updates = 0
        self._matched_at: float | None = None  # when the table last matched every file as it is
        self._behind = False  # a file is kept at its last good version, or the last update was rejected

    def health(self) -> SourceHealth:
        now = time.monotonic()
        if self._matched_at is None:
            return SourceHealth(None, False)
        age = now - self._matched_at if self._behind else 0.0
        return SourceHealth(age, age > self.stale_after, tuple(
            (f"file.{os.path.basename(path)}", "behind" if path in self.store.skipped else "current")
            for path in self.paths))

    def _rank(self, source: str) -> int:
        return self.paths.index(source)

    def _apply_changed(self, incremental: IncrementalTable) -> tuple[Built, dict[str, FileVersion]] | None:
        """The changed files applied to the running table, or None where that takes the full load."""
        if incremental.skipped:
            return None  # a file kept at its last good version may be good again, even with the same text as then
        changed = read_changed(self.paths, self._last_good)
        if changed is None:
            return None
        used = {**self._last_good, **changed}
        version = content_version(used[path][0] for path in self.paths)
        if not changed:
            return Built(incremental.table, incremental.warnings, incremental.notices, incremental.skipped,
                         incremental.kept_last_good), used
        built = incremental.apply({path: documents for path, (_, documents) in changed.items()}, version=version)
        return None if built is None else (built, used)

    async def load_once(self) -> bool:
        """Build from the files as they are now; True if a new table was published."""
        self._seen = await asyncio.to_thread(_fingerprint, self.paths)
        incremental, self._incremental = self._incremental, None
        applied = None
        if incremental is not None and set(self._last_good) == set(self.paths):
            applied = await build_off_loop(lambda: self._apply_changed(incremental))
        if applied is not None:
            assert incremental is not None
            built, used = applied
            self._incremental = incremental
            self.incremental_updates += 1
        else:
            try:
                built, used = await build_off_loop(lambda: self._load_all())
            except ConfigInvalidError as exc:
                self.store.reject(exc)
                self._behind = True
                log.error("configuration rejected, keeping version %r:\n%s", self.store.current.version or "none", exc)
                return False
        table = built.table
        self._last_good = used
        self._behind = bool(built.skipped)
        if not self._behind:
            self._matched_at = time.monotonic()
        for path, problems in built.skipped.items():
            log.error("%s rejected, keeping its last good version while the other files update:\n%s", path,
                      "\n".join(str(problem) for problem in problems))
        changed = table.version != self.store.current.version
        if changed or dict(built.skipped) != dict(self.store.skipped):
            for warning in built.warnings:
                log.warning("%s (ignored: --lenient)", warning)
            for notice in built.notices:
                log.info("%s", notice)
            self.store.publish(table, built.skipped)
            settle_heap()
            if changed:
                log.info("configuration version %s published (%d services, %d groups)", table.version,
                         len(table.services), len(table.groups))
        if built.skipped:
            self.store.reject(ConfigInvalidError([p for problems in built.skipped.values() for p in problems]))
        return changed

    def _load_all(self) -> tuple[Built, dict[str, FileVersion]]:
        """Every file read, parsed and built (a file that does not keeps its last good version); the indexes anew."""
        built, used = load_files_keeping(self.paths, namespace=self.namespace, lenient=self.lenient,
                                         last_good=self._last_good)
        self._incremental = IncrementalTable(built, namespace=self.namespace, rank=self._rank, sources=self.paths)
        return built, used

    async def start(self) -> None:
        self.store.health = self.health
        await self.load_once()
        if self._matched_at is None and self.store.ready:
            self._matched_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="file-source")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            fingerprint = await asyncio.to_thread(_fingerprint, self.paths)
            if fingerprint != self._seen:
                await self.load_once()
            elif not self._behind:
                self._matched_at = time.monotonic()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
