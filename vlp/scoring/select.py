"""``vlp select``: choose rows of a curated folder by their metadata and scores, without touching
pixels; the result is a *view* (``vlp.data.shards``) or, with ``materialize``, a new shard folder.

Predicates (``--where``, all must hold) are small Python-like expressions, parsed into a tree of
comparisons (never evaluated as code):

    scores.clip_l14.clip_score >= 0.28        a score column of the run ``_scores/clip_l14``
    lang == 'zh'   width >= 224   lang in ['zh', 'en']   not (height < 100) and motion > 0.01

Names are shard columns (any but the pixel columns) or ``scores.<run>.<column>``; comparisons with a
null (an unscored row) are false. ``top_fraction`` then keeps the best fraction of the rows that pass,
by one score column, over the whole folder or per caption language (``per_lang``: Chinese and English
scores sit on different scales). Ties keep the earlier row (shard order, then row order), so a
selection is deterministic. Only the named columns are read, never ``image`` or ``frames``.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlp.config import ConfigError
from vlp.data.schema import MANIFEST_FILE, PIXEL_COLUMNS, STATS_FILE, STATUS_COMPLETE
from vlp.data.shards import SELECTION_DIR, VIEW_FILE, ShardFile, ShardFolder, read_shard
from vlp.data.storage import Storage, join
from vlp.scoring.sidecar import MANIFEST as SCORES_MANIFEST
from vlp.scoring.sidecar import scores_folder

SCORE_PREFIX = "scores"

_COMPARE: dict[type, Callable] = {ast.Eq: pc.equal, ast.NotEq: pc.not_equal, ast.Lt: pc.less,
                                  ast.LtE: pc.less_equal, ast.Gt: pc.greater, ast.GtE: pc.greater_equal}


@dataclass(frozen=True)
class Predicate:
    """One parsed ``--where`` expression: the columns it reads and how to test a table of them."""

    text: str
    tree: ast.expr
    columns: frozenset[str]

    def mask(self, table: pa.Table) -> np.ndarray:
        result = _evaluate(self.tree, table, self.text)
        if not isinstance(result, (pa.Array, pa.ChunkedArray)) or not pa.types.is_boolean(result.type):
            raise ConfigError(f"--where {self.text!r} is not a condition (e.g. width >= 224)")
        return np.asarray(pc.fill_null(result, False).to_numpy(zero_copy_only=False), dtype=bool)


def _name(node: ast.expr, text: str) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value, text)}.{node.attr}"
    raise ConfigError(f"--where {text!r}: {ast.unparse(node)!r} is not a column name")


def _literal(node: ast.expr, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    if negative and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return -node.operand.value
    raise ConfigError(f"--where {text!r}: {ast.unparse(node)!r} is not a number, string or true/false")


def _columns(node: ast.expr, text: str) -> set[str]:
    if isinstance(node, (ast.Name, ast.Attribute)):
        return {_name(node, text)}
    if isinstance(node, ast.BoolOp):
        return set().union(*(_columns(v, text) for v in node.values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _columns(node.operand, text)
    if isinstance(node, ast.Compare):
        found = set()
        for part in [node.left, *node.comparators]:
            if isinstance(part, (ast.Name, ast.Attribute)):
                found |= _columns(part, text)
            elif isinstance(part, (ast.List, ast.Tuple)):
                [_literal(e, text) for e in part.elts]
            else:
                _literal(part, text)
        return found
    raise ConfigError(f"--where {text!r}: only comparisons joined by and/or/not are understood, not "
                      f"{ast.unparse(node)!r}")


def parse_predicate(text: str) -> Predicate:
    """Parse one ``--where`` expression; errors name what was not understood."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"--where {text!r} is not an expression like `width >= 224`") from None
    return Predicate(text=text, tree=tree, columns=frozenset(_columns(tree, text)))


def _operand(node: ast.expr, table: pa.Table, text: str):
    if isinstance(node, (ast.Name, ast.Attribute)):
        return table.column(_name(node, text))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, text) for e in node.elts]
    return pa.scalar(_literal(node, text))


def _evaluate(node: ast.expr, table: pa.Table, text: str):
    if isinstance(node, ast.BoolOp):
        combine = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        values = [_evaluate(v, table, text) for v in node.values]
        out = values[0]
        for value in values[1:]:
            out = combine(out, value)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return pc.invert(_evaluate(node.operand, table, text))
    if isinstance(node, ast.Compare):
        out, left = None, node.left
        for op, right in zip(node.ops, node.comparators):
            a, b = _operand(left, table, text), _operand(right, table, text)
            try:
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(b, list):
                        raise ConfigError(f"--where {text!r}: `in` takes a list, e.g. lang in ['zh']")
                    part = pc.is_in(a, value_set=pa.array(b))
                    part = pc.invert(part) if isinstance(op, ast.NotIn) else part
                    # a null is in no list
                    part = pc.and_kleene(part, pc.is_valid(a))
                elif type(op) in _COMPARE:
                    part = _COMPARE[type(op)](a, b)
                else:
                    raise ConfigError(f"--where {text!r}: the operator {ast.dump(op)} is not understood")
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid, TypeError) as e:
                raise ConfigError(f"--where {text!r}: cannot compare {ast.unparse(left)} with "
                                  f"{ast.unparse(right)} ({str(e).splitlines()[0]})") from None
            out = part if out is None else pc.and_kleene(out, part)
            left = right
        return out
    raise ConfigError(f"--where {text!r}: {ast.unparse(node)!r} is not a condition")


@dataclass(frozen=True)
class Selection:
    """What to keep. ``by``: a column (``scores.<run>.<col>`` or a shard column) ranking the rows for
    ``top_fraction``."""

    where: tuple[str, ...] = ()
    top_fraction: float | None = None
    by: str = ""
    per_lang: bool = False

    def __post_init__(self):
        if self.top_fraction is not None:
            if not 0.0 < self.top_fraction <= 1.0:
                raise ConfigError("--top-fraction must be in (0, 1]")
            if not self.by:
                raise ConfigError("--top-fraction needs --by COLUMN, e.g. --by scores.NAME.clip_score")
        elif self.per_lang or self.by:
            raise ConfigError("--by and --per-lang rank rows for --top-fraction: give it too")

    def provenance(self) -> dict:
        """How a view was selected, as written into it."""
        return {"where": list(self.where), "top_fraction": self.top_fraction, "by": self.by or None,
                "per_lang": self.per_lang}

    def predicates(self) -> list[Predicate]:
        return [parse_predicate(w) for w in self.where]

    def columns(self) -> set[str]:
        needed = set().union(*(p.columns for p in self.predicates())) if self.where else set()
        return needed | ({self.by, "lang"} if self.top_fraction is not None else set())


@dataclass
class SelectedShard:
    name: str
    rows_in: int
    rows: np.ndarray  # selected row numbers, increasing
    langs_in: dict[str, int] = field(default_factory=dict)
    langs_kept: dict[str, int] | None = None  # None: not counted yet (selection_stats reads them)


def _score_runs(folder: ShardFolder, columns: set[str], storage: Storage) -> dict[str, list[str]]:
    """Score runs named by ``columns`` -> their columns; checks each run is complete and has them."""
    runs: dict[str, list[str]] = {}
    for column in sorted(c for c in columns if c.startswith(SCORE_PREFIX + ".")):
        parts = column.split(".")
        if len(parts) != 3:
            raise ConfigError(f"{column!r}: a score column is scores.<run name>.<column>")
        runs.setdefault(parts[1], []).append(parts[2])
    for run, wanted in runs.items():
        manifest_uri = join(scores_folder(folder.uri, run), SCORES_MANIFEST)
        if not storage.exists(manifest_uri):
            raise ConfigError(f"no scores named {run!r} in {folder.uri}: run `vlp score --shards "
                              f"{folder.uri} --model M --name {run}` first")
        manifest = json.loads(storage.read_bytes(manifest_uri))
        if manifest.get("status") != STATUS_COMPLETE:
            raise ConfigError(f"the scores {run!r} of {folder.uri} are not complete: finish them with "
                              "`vlp score ... --resume`")
        if manifest.get("shards_manifest_sha256") != folder.manifest_sha256:
            raise ConfigError(f"the scores {run!r} were computed on {folder.uri} before it changed: "
                              "score again")
        known = {"clip_score", "key"} | ({"image_embedding", "text_embedding"}
                                         if manifest["settings"].get("embeddings") else set())
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ConfigError(f"the scores {run!r} have no column {unknown[0]!r}; they have "
                              f"{sorted(known)}")
    return runs


def _shard_table(folder: ShardFolder, shard_path: str, shard_columns: list[str],
                 runs: dict[str, list[str]], storage: Storage) -> pa.Table:
    """The named columns of one shard, score columns beside them (sidecars align row for row)."""
    table = pa.Table.from_batches(list(read_shard(shard_path, storage, shard_columns,
                                                  batch_size=65536)))
    name = shard_path.rsplit("/", 1)[-1]
    columns = {c: table.column(c) for c in shard_columns}
    for run, wanted in runs.items():
        with storage.open_input(join(scores_folder(folder.uri, run), name)) as f:
            sidecar = pq.read_table(pa.BufferReader(f.read()), columns=wanted)
        for column in wanted:
            columns[f"{SCORE_PREFIX}.{run}.{column}"] = sidecar.column(column)
    return pa.table(columns)


def select_rows(folder: ShardFolder, selection: Selection, storage: Storage) -> list[SelectedShard]:
    """The rows of each shard that the selection keeps."""
    if folder.view is not None:
        raise ConfigError(f"{folder.uri} is a view: select from its shard folder "
                          f"({folder.source_uri}) with all the conditions at once")
    predicates = selection.predicates()
    needed = selection.columns()
    schema_names = set(folder.kind.schema.names)
    shard_columns = sorted(c for c in needed if not c.startswith(SCORE_PREFIX + "."))
    for column in shard_columns:
        if column in PIXEL_COLUMNS:
            raise ConfigError(f"{column!r} holds pixels: select by metadata and score columns")
        if column not in schema_names:
            raise ConfigError(f"no column {column!r} in {folder.kind.value} shards; known: "
                              f"{sorted(schema_names - set(PIXEL_COLUMNS))} and scores.<run>.<column>")
    if "lang" not in shard_columns:
        shard_columns.append("lang")  # stats per language
    runs = _score_runs(folder, needed, storage)
    chosen: list[SelectedShard] = []
    shard_langs: list[np.ndarray] = []
    ranked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per shard: rows, by values, langs
    for shard in folder.shards:
        table = _shard_table(folder, shard.path, shard_columns, runs, storage)
        keep = np.ones(table.num_rows, dtype=bool)
        for predicate in predicates:
            keep &= predicate.mask(table)
        langs = np.asarray(table.column("lang").to_pylist(), dtype=object)
        shard_langs.append(langs)
        rows = np.flatnonzero(keep).astype(np.int64)
        chosen.append(SelectedShard(name=shard.path.rsplit("/", 1)[-1], rows_in=table.num_rows,
                                    rows=rows, langs_in=count_values(langs)))
        if selection.top_fraction is not None:
            values = table.column(selection.by)
            if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
                raise ConfigError(f"--by {selection.by}: a number column is needed, it holds "
                                  f"{values.type}")
            by = np.asarray(pc.fill_null(values.cast(pa.float64()), math.nan)
                            .to_numpy(zero_copy_only=False))[rows]
            ranked.append((rows, by, langs[rows]))
    if selection.top_fraction is not None:
        _keep_top(chosen, ranked, selection)
    for shard, langs in zip(chosen, shard_langs):  # counted here: the column is already read
        shard.langs_kept = count_values(langs[shard.rows])
    return chosen


def count_values(langs: np.ndarray) -> dict[str, int]:
    """How many times each value (e.g. a caption language) occurs."""
    values, counts = np.unique(langs.astype(str), return_counts=True) if len(langs) else ([], [])
    return {str(v): int(c) for v, c in zip(values, counts)}


def _keep_top(chosen: list[SelectedShard], ranked, selection: Selection) -> None:
    """Keep, per group (language, or all), the best ``top_fraction`` by the ranking column; rows
    without a value (NaN) are never among the best."""
    shard_of = np.concatenate([np.full(len(r[0]), i) for i, r in enumerate(ranked)])
    rows = np.concatenate([r[0] for r in ranked])
    by = np.concatenate([r[1] for r in ranked])
    langs = np.concatenate([r[2] for r in ranked]).astype(str)
    groups = langs if selection.per_lang else np.full(len(rows), "all")
    keep = np.zeros(len(rows), dtype=bool)
    for group in np.unique(groups):
        members = np.flatnonzero((groups == group) & ~np.isnan(by))
        k = int(math.floor(selection.top_fraction * len(np.flatnonzero(groups == group)) + 0.5))
        # best first; ties: earlier shard, then earlier row (lexsort's last key is the primary one)
        order = members[np.lexsort((rows[members], shard_of[members], -by[members]))]
        keep[order[:k]] = True
    for i, shard in enumerate(chosen):
        shard.rows = np.sort(rows[keep & (shard_of == i)])


def write_view(folder: ShardFolder, chosen: list[SelectedShard], selection: "Selection | dict",
               output: str, storage: Storage, *, check_empty: bool = True) -> dict:
    """A view folder at ``output``: ``_selection/<shard>.parquet`` per shard with rows, then
    ``_stats.json`` and, last, ``_view.json`` (a view without it is not one). ``selection``: what
    chose the rows (a ``Selection``, or any JSON-able description, e.g. semantic dedup's)."""
    if check_empty:
        check_empty_output(output, storage)
    entries = []
    for shard in chosen:
        entry = {"name": shard.name, "rows_in": shard.rows_in, "rows": int(len(shard.rows)),
                 "selection": None}
        if len(shard.rows):
            entry["selection"] = f"{SELECTION_DIR}/{shard.name}"
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({"row": pa.array(shard.rows, pa.int64())}), sink, compression="zstd")
            storage.write_bytes_atomic(join(output, entry["selection"]), sink.getvalue())
        entries.append(entry)
    stats = selection_stats(folder, chosen, storage)
    how = selection.provenance() if isinstance(selection, Selection) else dict(selection)
    view = {"kind": "view", "source": folder.uri, "source_manifest_sha256": folder.manifest_sha256,
            "source_kind": folder.kind.value, "rows": stats["rows_kept"], "rows_in": stats["rows_in"],
            **how, "shards": entries}
    storage.write_bytes_atomic(join(output, STATS_FILE), json.dumps(stats, indent=2).encode())
    storage.write_bytes_atomic(join(output, VIEW_FILE), json.dumps(view, indent=2).encode())
    return stats


def selection_stats(folder: ShardFolder, chosen: list[SelectedShard], storage: Storage) -> dict:
    """Rows in and kept, overall and per caption language."""
    langs_in: dict[str, int] = {}
    langs_kept: dict[str, int] = {}
    for shard in chosen:
        for lang, n in shard.langs_in.items():
            langs_in[lang] = langs_in.get(lang, 0) + n
    for shard_file, shard in zip(folder.shards, chosen):
        if shard.langs_kept is not None:
            for lang, n in shard.langs_kept.items():
                langs_kept[lang] = langs_kept.get(lang, 0) + n
        elif len(shard.rows):
            table = pa.Table.from_batches(list(read_shard(shard_file.path, storage, ["lang"],
                                                          batch_size=65536)))
            kept = np.asarray(table.column("lang").to_pylist(), dtype=object)[shard.rows]
            for lang, n in count_values(kept).items():
                langs_kept[lang] = langs_kept.get(lang, 0) + n
    rows_in = sum(s.rows_in for s in chosen)
    rows_kept = sum(len(s.rows) for s in chosen)
    return {"rows_in": rows_in, "rows_kept": rows_kept,
            "fraction_kept": round(rows_kept / rows_in, 6) if rows_in else 0.0,
            "by_language": {lang: {"rows_in": n, "rows_kept": langs_kept.get(lang, 0)}
                            for lang, n in sorted(langs_in.items())}}


def materialize(folder: ShardFolder, chosen: list[SelectedShard], selection: Selection, output: str,
                storage: Storage) -> dict:
    """Real shards at ``output`` holding only the selected rows (pixels copied), with a manifest in
    the curated format (``derived_from`` names the source and the selection): a folder every reader
    takes, for users who need files rather than a view."""
    check_empty_output(output, storage)
    by_name = {s.path.rsplit("/", 1)[-1]: s for s in folder.shards}
    shards = []
    for shard in chosen:
        if not len(shard.rows):
            continue
        source = by_name[shard.name]
        view_file = join(output, "_tmp_selection", shard.name)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"row": pa.array(shard.rows, pa.int64())}), sink)
        storage.write_bytes_atomic(view_file, sink.getvalue())
        batches = read_shard(ShardFile(source.path, len(shard.rows), view_file), storage,
                             folder.kind.schema.names, batch_size=1024)
        with storage.atomic_output(join(output, shard.name)) as f:
            writer = pq.ParquetWriter(f, folder.kind.schema, compression="zstd")
            try:
                for batch in batches:
                    writer.write_table(pa.Table.from_batches([batch]).cast(folder.kind.schema))
            finally:
                writer.close()
            nbytes = f.tell()
        storage.delete(view_file)
        shards.append({"name": shard.name, "rows": int(len(shard.rows)), "bytes": nbytes})
    stats = selection_stats(folder, chosen, storage)
    manifest = {**folder.manifest, "status": STATUS_COMPLETE, "shards": shards,
                "num_rows": stats["rows_kept"], "num_bytes": sum(s["bytes"] for s in shards),
                "derived_from": {"source": folder.uri, "source_manifest_sha256": folder.manifest_sha256,
                                 **selection.provenance()}}
    storage.write_bytes_atomic(join(output, STATS_FILE), json.dumps(stats, indent=2).encode())
    storage.write_bytes_atomic(join(output, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
    return stats


def check_empty_output(output: str, storage: Storage) -> None:
    if storage.exists(output) and storage.list_files(output):
        raise ConfigError(f"--output {output} is not empty: choose a new folder (a view is cheap)")

