"""Model bundle: one directory holding everything a trained model needs, checked before it is trusted.

Layout::

    <bundle>/
      manifest.json           format, version, data fingerprint, sha256 + size of every file below
      <name>.safetensors      one state dict per file (model, prototypes, ...)
      <name>.json             config, vocabulary, metrics, ...
      <name>.onnx             artifacts read by other runtimes (the device model), checked but not parsed here
      items.json              optional: item attributes (title, year, genres, ...) aligned with the vocabulary

Why this shape: the registry and the serving fleet need to (1) refuse a half-written, truncated or
tampered model with a clear message instead of a stack trace, (2) never execute code while loading
(safetensors and JSON only, never pickle / ``torch.load``), and (3) name a model by its content
(:func:`bundle_sha256`). Bundles are written to a sibling temporary directory and moved into place with
``os.replace``, so a reader never sees a half bundle at the target path.

Example::

    >>> b = save_bundle(tmp / "m", tensors={"model": {"w": torch.ones(2)}},
    ...                 documents={"config": {"dim": 2}}, data_fingerprint="abc")
    >>> load_bundle(tmp / "m").documents["config"]
    {'dim': 2}
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from recsys.errors import BundleError

logger = logging.getLogger(__name__)

FORMAT = "persona-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_SUFFIX = ".safetensors"
DOCUMENT_SUFFIX = ".json"
#: Raw files a bundle may carry for other runtimes (the device model): hashed and size-checked like the others,
#: never parsed by the loader.
ARTIFACT_SUFFIXES = (".onnx",)

# Simple names only: no separators, so a name can never point outside the bundle directory.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass
class Bundle:
    """A loaded (or just saved) bundle.

    Attributes:
        path: the bundle directory.
        manifest: the parsed ``manifest.json``.
        tensors: file stem -> state dict (CPU tensors), e.g. ``tensors["model"]["head.weight"]``.
        documents: file stem -> parsed JSON, e.g. ``documents["config"]``.
    """

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    documents: dict[str, Any]

    @property
    def version(self) -> str:
        """The bundle's version string (``manifest["version"]``)."""
        return str(self.manifest["version"])


#: Document stem of the optional item attributes (:class:`ItemMetadata`).
ITEMS = "items"


@dataclass(frozen=True)
class ItemMetadata:
    """Item attributes aligned with the model's vocabulary: ``columns[name][i]`` belongs to vocabulary index ``i``.

    Aligned lists, not a dict per item id: a response looks an attribute up by the index the ranking already
    has, one list access per item shown. Values are JSON values (text, numbers, lists); ``None`` where the item
    file had none, and in the reserved PAD/UNK slots. ``title`` is the column the API always returns.

    Example::

        >>> meta = ItemMetadata({"title": [None, None, "Toy Story"], "year": [None, None, 1995]})
        >>> meta.describe(2, ("year",))
        {'title': 'Toy Story', 'year': 1995}
    """

    columns: dict[str, list[Any]]

    @property
    def fields(self) -> tuple[str, ...]:
        """The attribute names, in file order."""
        return tuple(self.columns)

    def describe(self, index: int, fields: Sequence[str] = ()) -> dict[str, Any]:
        """``title`` (None when unknown) plus ``fields`` of the item at vocabulary ``index``."""
        titles = self.columns.get("title")
        out: dict[str, Any] = {"title": titles[index] if titles is not None else None}
        for name in fields:
            out[name] = self.columns[name][index]
        return out

    def to_document(self) -> dict[str, Any]:
        return {"columns": self.columns}

    @classmethod
    def from_document(cls, document: Any, size: int) -> ItemMetadata:
        """Parse ``items.json``; ``size`` is the vocabulary's, which every column must match.

        Raises:
            BundleError: not the shape written by :meth:`to_document`, or columns of another length.
        """
        columns = document.get("columns") if isinstance(document, dict) else None
        if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
            raise BundleError(f"{ITEMS}{DOCUMENT_SUFFIX} is not a table of item attributes", "retrain the bundle")
        bad = [name for name, values in columns.items() if len(values) != size]
        if bad:
            raise BundleError(
                f"{ITEMS}{DOCUMENT_SUFFIX}: column {bad[0]!r} does not match the vocabulary ({size} items)",
                "retrain the bundle",
            )
        return cls(columns)


def library_version() -> str:
    """Installed persona-recsys version, recorded in every manifest to trace which code wrote it."""
    try:
        return importlib.metadata.version("persona-recsys")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _check_stem(stem: str, kind: str) -> None:
    if not isinstance(stem, str) or not _NAME.fullmatch(stem) or stem.startswith("."):
        raise BundleError(
            f"bad {kind} name {stem!r} in a bundle",
            "use letters, digits, '_', '-' and '.', not starting with '.' (no paths)",
        )


def _json_text(value: Any, what: str) -> bytes:
    try:
        return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{what} cannot be written as JSON: {exc}", "pass plain dicts, lists, str, numbers") from exc


def _cpu_state_dict(stem: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) are cloned for safetensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BundleError(
                f"tensor file {stem!r}: entry {key!r} is not a str -> torch.Tensor pair",
                "pass a state dict such as model.state_dict()",
            )
        if value.layout != torch.strided:
            raise BundleError(
                f"tensor file {stem + TENSOR_SUFFIX}: {key!r} is a {value.layout} tensor",
                "only dense tensors can be saved; call .to_dense() first",
            )
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def save_bundle(
    out: Path,
    *,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    documents: Mapping[str, Any],
    data_fingerprint: str,
    version: str | None = None,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    artifacts: Mapping[str, bytes] | None = None,
) -> Bundle:
    """Write a bundle directory atomically and return it.

    Args:
        out: target directory; if it exists it is replaced only with ``overwrite=True``.
        tensors: file stem -> state dict; written as ``<stem>.safetensors`` (CPU, contiguous).
        documents: file stem -> JSON-serialisable value; written as ``<stem>.json``.
        data_fingerprint: identifies the training data, so a model can be traced to its inputs.
        version: defaults to ``<UTC yyyymmddThhmmssZ>-<first 8 hex of the content hash>``.
        meta: free-form JSON stored in the manifest.
        overwrite: allow replacing an existing ``out``.
        artifacts: file name (ending in one of :data:`ARTIFACT_SUFFIXES`) -> raw bytes, e.g. ``device.onnx``.

    Files go to ``<out>.tmp-<random>`` first, then one ``os.replace``; on any failure the temporary
    directory is removed and ``out`` is left as it was. With ``overwrite`` the old bundle is moved aside
    just before the swap and deleted after it.

    Raises:
        BundleError: ``out`` exists without ``overwrite``, a bad name, or a value that cannot be written.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"a model bundle already exists at {out}", "pass overwrite=True (--overwrite) to replace it")
    for stem in tensors:
        _check_stem(stem, "tensor file")
    for stem in documents:
        _check_stem(stem, "document")
    if f"{MANIFEST[: -len(DOCUMENT_SUFFIX)]}" in documents:
        raise BundleError("a document cannot be named 'manifest'", "rename it; manifest.json is the bundle's index")
    for name in artifacts or {}:
        _check_stem(name, "artifact")
        if not name.endswith(ARTIFACT_SUFFIXES):
            raise BundleError(f"bad artifact name {name!r}", f"end it with one of {', '.join(ARTIFACT_SUFFIXES)}")
    if version is not None:
        _check_stem(version, "version")
    meta_dict = dict(meta or {})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    old: Path | None = None
    try:
        files: dict[str, dict[str, Any]] = {}
        saved_tensors: dict[str, dict[str, torch.Tensor]] = {}
        for stem, state in tensors.items():
            cpu_state = _cpu_state_dict(stem, state)
            name = stem + TENSOR_SUFFIX
            try:
                safetensors.torch.save_file(cpu_state, str(tmp / name))
            except Exception as exc:
                raise BundleError(f"tensor file {name} cannot be written: {exc}", "pass dense tensors") from exc
            sha, size = _file_digest(tmp / name)
            files[name] = {"sha256": sha, "bytes": size}
            saved_tensors[stem] = cpu_state
        saved_documents: dict[str, Any] = {}
        for stem, document in documents.items():
            name = stem + DOCUMENT_SUFFIX
            data = _json_text(document, f"document {stem!r}")
            _write(tmp / name, data)
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            saved_documents[stem] = json.loads(data)  # what a loader will see (tuples become lists, ...)
        for name, data in (artifacts or {}).items():
            _write(tmp / name, bytes(data))
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

        files = dict(sorted(files.items()))
        content = hashlib.sha256("".join(f"{n}\0{f['sha256']}\n" for n, f in files.items()).encode())
        now = datetime.now(UTC)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": version or f"{now:%Y%m%dT%H%M%SZ}-{content.hexdigest()[:8]}",
            "created_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "data_fingerprint": str(data_fingerprint),
            "library_version": library_version(),
            "files": files,
            "meta": meta_dict,
        }
        _write(tmp / MANIFEST, _json_text(manifest, "manifest meta"))
        _fsync_dir(tmp)

        if out.exists() or out.is_symlink():
            if not overwrite:  # appeared while we were writing
                raise BundleError(f"a model bundle already exists at {out}", "pass overwrite=True to replace it")
            old = out.parent / f"{out.name}.old-{secrets.token_hex(6)}"
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        _remove(tmp)
        if old is not None and not out.exists():  # failed between the two renames: put the old one back
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)
    return Bundle(path=out, manifest=manifest, tensors=saved_tensors, documents=saved_documents)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise BundleError(f"no model bundle at {path} ({what})", f"train one with `persona train --out {path}`")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"{path} has no {MANIFEST}; it is not a model bundle (or was only partly copied)",
            f"train one with `persona train --out {path}`",
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}", "the bundle is corrupt; retrain it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a {FORMAT} manifest", "point at a directory written by persona")
    found = manifest.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool):
        raise BundleError(f"{manifest_path} has no integer format_version", "the bundle is corrupt; retrain it")
    if found != FORMAT_VERSION:
        hint = "upgrade persona to read it" if found > FORMAT_VERSION else "retrain it with this persona"
        raise BundleError(f"bundle format {found}, this persona reads {FORMAT_VERSION}; retrain or upgrade", hint)
    if not isinstance(manifest.get("version"), str) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{manifest_path} lacks 'version' or 'files'", "the bundle is corrupt; retrain it")
    for name, entry in manifest["files"].items():
        if (
            not _NAME.fullmatch(name)
            or name.startswith(".")
            or name == MANIFEST
            or not name.endswith((TENSOR_SUFFIX, DOCUMENT_SUFFIX, *ARTIFACT_SUFFIXES))
        ):
            raise BundleError(f"{manifest_path} lists a bad file name {name!r}", "the manifest was tampered with")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])
            or not isinstance(entry.get("bytes"), int)
        ):
            raise BundleError(f"{manifest_path}: bad entry for {name}", "the manifest was tampered with")
    return manifest


def _check_file(path: Path, name: str, entry: Mapping[str, Any], data: bytes | None = None) -> None:
    """Size and sha256 of one listed file against the manifest; ``data`` when already read."""
    file = path / name
    if data is None:
        if not file.is_file():
            raise BundleError(
                f"bundle file {name} is missing from {path}", "the bundle was partly copied; copy it again"
            )
        sha, size = _file_digest(file)
    else:
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
    if size != entry["bytes"]:
        raise BundleError(
            f"bundle file {name} is truncated or altered: {size} bytes, its manifest says {entry['bytes']}",
            "copy the bundle again or retrain it",
        )
    if sha != entry["sha256"]:  # same size: bytes were changed in place (corruption or tampering)
        raise BundleError(
            f"bundle file {name} fails its checksum: sha256 {sha[:12]}..., its manifest says {entry['sha256'][:12]}...",
            "copy the bundle again or retrain it",
        )


def _warn_extra(path: Path, listed: Mapping[str, Any]) -> None:
    for child in sorted(path.iterdir()):
        known = (TENSOR_SUFFIX, DOCUMENT_SUFFIX, *ARTIFACT_SUFFIXES)
        if child.name != MANIFEST and child.name not in listed and child.suffix in known:
            logger.warning("ignoring %s in bundle %s: not listed in its manifest", child.name, path)


def verify_bundle(path: Path) -> dict[str, Any]:
    """Check a bundle without loading tensors; returns its manifest.

    Raises:
        BundleError: missing / not a directory, bad or unsupported manifest, or any listed file missing,
            truncated or modified (the message names the file).
    """
    path = Path(path)
    manifest = _read_manifest(path)
    for name, entry in manifest["files"].items():
        _check_file(path, name, entry)
    _warn_extra(path, manifest["files"])
    return manifest


def load_bundle(path: Path) -> Bundle:
    """Verify and load a bundle with safe loaders only (safetensors, JSON; never pickle).

    Each file is read once and its hash checked on exactly the bytes that are parsed, so a file swapped
    between checking and loading cannot slip through. Tensors come back on the CPU.

    Raises:
        BundleError: as :func:`verify_bundle`.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    documents: dict[str, Any] = {}
    for name, entry in manifest["files"].items():
        file = path / name
        if name.endswith(ARTIFACT_SUFFIXES):  # checked here, read by whoever serves it (read_artifact)
            _check_file(path, name, entry)
            continue
        if not file.is_file():
            raise BundleError(
                f"bundle file {name} is missing from {path}", "the bundle was partly copied; copy it again"
            )
        data = file.read_bytes()
        _check_file(path, name, entry, data)
        if name.endswith(TENSOR_SUFFIX):
            try:
                tensors[name[: -len(TENSOR_SUFFIX)]] = safetensors.torch.load(data)
            except Exception as exc:  # hash matched, so the writer produced it: still say which file
                raise BundleError(f"bundle file {name} is not a valid safetensors file: {exc}", "retrain") from exc
        else:
            try:
                documents[name[: -len(DOCUMENT_SUFFIX)]] = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BundleError(f"bundle file {name} is not valid JSON: {exc}", "retrain") from exc
    _warn_extra(path, manifest["files"])
    return Bundle(path=path, manifest=manifest, tensors=tensors, documents=documents)


def read_artifact(path: Path, name: str) -> bytes | None:
    """The bytes of artifact ``name`` of the bundle at ``path``, checked against its manifest; ``None`` when the
    bundle has no such artifact (bundles written before it existed).

    Raises:
        BundleError: a bad manifest, or the file missing, truncated or modified.
    """
    path = Path(path)
    entry = _read_manifest(path)["files"].get(name)
    if entry is None:
        return None
    file = path / name
    if not file.is_file():
        raise BundleError(f"bundle file {name} is missing from {path}", "the bundle was partly copied; copy it again")
    data = file.read_bytes()
    _check_file(path, name, entry, data)
    return data


def bundle_sha256(path: Path) -> str:
    """sha256 of ``manifest.json``: it pins every file's hash, so it identifies the bundle's content.

    Does not re-hash the files; call :func:`verify_bundle` first when the directory is untrusted.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"no model bundle at {path} (no {MANIFEST})", f"train one with `persona train --out {path}`")
    digest, _ = _file_digest(manifest_path)
    return digest
