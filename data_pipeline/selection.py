"""Which records a pretraining run reads: every record of its shards, a
subset, and optional mixture weights per source or modality; and which record
global example position e reads (`Selection.record`).

`resolve` turns `config.data.shards` (shards, a subset, or the built-in
"mini") and `config.data.mixture` into a `Resolved` input, once per run: the
train loop takes the step counts, the resume facts and the loader's records
from it.

A subset is a small index over existing shards, not a copy:
`<shard_dir>/subsets/<name>.subset.json` (what was selected, how, the counts)
beside `<name>.npy` (the global record numbers, in shard order). Name it in a
config as the shards: `--config.data.shards=/data/corpus/subsets/us_only.subset.json`.

    python -m data_pipeline.selection --shards=/data/corpus --name=us_only --modality=ultrasound
    python -m data_pipeline.selection --shards=/data/corpus --name=0.2M --count=0.2M

Mixture weights (`config.data.mixture = dict(by="modality", weights={...})`)
make example e draw its group with probability weight / sum(weights) and a
record of that group uniformly, from np.random.default_rng([seed, 7, e]):
still a pure function of (seed, e), so resuming is exact. Groups without a
weight are not sampled; a weight for a group the data lacks is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import re
import zlib
from typing import Any

import grain
import numpy as np

from data_pipeline import storage
from data_pipeline.errors import ConfigError
from data_pipeline import shards as shards_lib

SUBSET_SUFFIX = ".subset.json"


def parse_count(text: str | int | float | None, total: int) -> int | None:
  """'all' | '200000' | '200k' | '0.2M' | 0.25 (a fraction) -> a record count."""
  if text is None or text == "all":
    return None
  if isinstance(text, float) or (isinstance(text, str) and re.fullmatch(r"0?\.\d+", text)):
    frac = float(text)
    if not 0 < frac <= 1:
      raise ValueError(f"fraction {text!r} must be in (0, 1]")
    return max(1, int(round(frac * total)))
  m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", str(text).strip())
  if not m:
    raise ValueError(f"count {text!r}: use an integer, '200k', '0.2M', a fraction or 'all'")
  n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
  return int(round(n))


def parse_weights(text: str) -> dict[str, float]:
  """'ultrasound:0.5,CT:0.3' -> {'ultrasound': 0.5, 'CT': 0.3}."""
  out = {}
  for part in (p.strip() for p in text.split(",") if p.strip()):
    name, sep, value = part.rpartition(":")
    try:
      if not sep or not name:
        raise ValueError
      out[name.strip()] = float(value)
    except ValueError:
      raise ConfigError(f"config.data.mixture.weights: {part!r} is not name:weight") from None
  return out


def _mask(index: dict, key: str, names, where: str) -> np.ndarray:
  table = [str(x) for x in index[f"{key}_names"]]
  unknown = sorted(set(names) - set(table))
  if unknown:
    raise ValueError(f"{where}: no {key} named {unknown}; the shards hold {table}")
  ids = [table.index(n) for n in names]
  return np.isin(index[key], ids)


def stratified_draw(ids: np.ndarray, groups: np.ndarray, names: list[str], k: int,
                    seed: int) -> np.ndarray:
  """`k` of `ids` (in shard order), each group (source) getting a share
  proportional to its size (largest remainder, ties by name), drawn within the
  group by np.random.default_rng([seed, crc32(name)]): a group's draw depends on
  its own records alone, so the same sources give the same subset."""
  order = sorted(set(groups.tolist()), key=lambda g: names[g])
  sizes = np.array([np.sum(groups == g) for g in order])
  exact = k * sizes / sizes.sum()
  share = np.floor(exact).astype(int)
  for i in sorted(range(len(order)), key=lambda i: (share[i] - exact[i], names[order[i]]))[
      :k - share.sum()]:
    share[i] += 1
  picked = []
  for g, n in zip(order, share):
    members = ids[groups == g]
    rng = np.random.default_rng([seed, zlib.crc32(names[g].encode())])
    picked.append(members[rng.permutation(len(members))[:n]])
  return np.sort(np.concatenate(picked))


def make_subset(shard_dir: str, name: str, *, count=None, modalities=None, sources=None,
                seed: int = 0, stratify: str | None = None, description: str = "") -> str:
  """Writes subset `name` of the records in `shard_dir` and returns its path.

  Records are filtered by modality and/or source, then `count` of them (an
  integer, '0.2M', a fraction or 'all') are drawn with np.random.default_rng(seed),
  or per source with `stratify="source"` (see `stratified_draw`), and kept in
  shard order. The same arguments always give the same subset.
  """
  if not re.fullmatch(r"[\w.\-]+", name):
    raise ValueError(f"subset name {name!r}: use letters, digits, '.', '-' or '_'")
  if not storage.is_remote(shard_dir):
    shard_dir = os.path.abspath(os.path.expanduser(shard_dir))
  manifest = shards_lib.read_manifest(shard_dir)
  index = shards_lib.read_index(shard_dir)
  mask = np.ones(len(index["shard"]), bool)
  if modalities:
    mask &= _mask(index, "modality", modalities, f"subset {name!r}")
  if sources:
    mask &= _mask(index, "source", sources, f"subset {name!r}")
  ids = np.flatnonzero(mask)
  k = parse_count(count, len(ids))
  if k is not None:
    if k > len(ids):
      raise ValueError(f"subset {name!r}: asks for {k} records, the selection holds {len(ids)}")
    if stratify == "source":
      ids = stratified_draw(ids, index["source"][ids],
                            [str(x) for x in index["source_names"]], k, seed)
    elif stratify is not None:
      raise ValueError(f"subset {name!r}: stratify={stratify!r}; only 'source'")
    else:
      ids = np.sort(ids[np.random.default_rng(seed).permutation(len(ids))[:k]])
  if len(ids) == 0:
    raise ValueError(f"subset {name!r} selects no records")
  out = storage.join(shard_dir, "subsets")
  storage.makedirs(out)
  buf = io.BytesIO()
  np.save(buf, ids.astype(np.int64))
  storage.write_bytes_atomic(storage.join(out, f"{name}.npy"), buf.getvalue())
  src = [str(index["source_names"][i]) for i in index["source"][ids]]
  mod = [str(index["modality_names"][i]) for i in index["modality"][ids]]
  doc = {"name": name, "shard_dir": "..", "records": f"{name}.npy",
         "shards": [s["file"] for s in manifest["shards"]], "num_records": int(len(ids)),
         "of_records": int(len(index["shard"])),
         "selection": {"count": count, "modalities": modalities, "sources": sources,
                       "seed": seed, "stratify": stratify},
         **({"description": description} if description else {}),
         **shards_lib.manifest_counts(src, mod)}
  path = storage.join(out, name + SUBSET_SUFFIX)
  shards_lib.write_json_atomic(path, doc)
  return path


def epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed for epoch `epoch`'s permutation (index_shuffle takes uint32)."""
  return int(np.random.SeedSequence([seed, 1, epoch]).generate_state(1)[0])


def record_index(e: int, seed: int, n: int) -> int:
  """The record that global example position `e` reads (before skipping)."""
  epoch, k = divmod(e, n)
  # index_shuffle is a keyed bijection of [0, n): O(1) memory for any corpus.
  return int(grain.experimental.index_shuffle(k, max_index=n - 1,
                                              seed=epoch_seed(seed, epoch), rounds=4))


class Selection:
  """Maps global example position e (and a corrupt-record skip count) to a
  record number in the concatenated shards; picklable for grain workers."""

  def __init__(self, num_records: int, ids: np.ndarray | None = None,
               groups: list[np.ndarray] | None = None, weights: np.ndarray | None = None):
    self.total = int(num_records)
    self.ids = ids
    self.groups, self.weights = groups, weights

  @property
  def size(self) -> int:
    """Records in play (what an epoch means for step counting)."""
    return len(self.ids) if self.ids is not None else self.total

  def record(self, e: int, skipped: int, seed: int) -> int:
    if self.groups is not None:
      rng = np.random.default_rng([seed, 7, e])
      g = self.groups[int(rng.choice(len(self.groups), p=self.weights))]
      return int(g[(int(rng.integers(len(g))) + skipped) % len(g)])
    k = (record_index(e, seed, self.size) + skipped) % self.size
    return int(self.ids[k]) if self.ids is not None else k


def is_subset(spec) -> bool:
  return isinstance(spec, str) and spec.endswith(SUBSET_SUFFIX)


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A run's input, resolved once: the shards, opened; which records are in play."""
  spec: str                               # config.data.shards, for messages
  paths: list[str]
  records: grain.sources.ArrayRecordDataSource  # picklable; grain ships it to workers
  chosen: Selection

  @property
  def num_records(self) -> int:
    """Records in play: what an epoch means for step counting."""
    return self.chosen.size

  def facts(self) -> dict[str, Any]:
    """What the input stream is made of, for the resume check: the records in
    play and every shard as [file name, bytes]."""
    return {"num_records": self.num_records,
            "shards": [[p.rsplit("/", 1)[-1], n]
                       for p, n in zip(self.paths, shards_lib.shard_sizes(self.paths))]}


def shard_paths(spec, cache_dir: str | None) -> list[str]:
  """shards.resolve_shards, where the item "mini" is the built-in corpus (built
  on first use in `cache_dir`)."""
  # Imported here: the corpus builder pulls in every reader; only "mini" needs it.
  from data_pipeline import mini  # pylint: disable=import-outside-toplevel
  return shards_lib.resolve_shards(
      spec, {"mini": functools.partial(mini.build_mini_corpus, cache_dir)})


def resolve(spec, cache_dir: str | None, mixture: Any = None) -> Resolved:
  """The `Resolved` input of a data config's `shards` and `mixture`."""
  ids = None
  if is_subset(spec):
    path = storage.as_path(spec)
    if not path.is_file():
      raise FileNotFoundError(f"config.data.shards={spec!r}: no such subset file")
    doc = json.loads(path.read_text())
    base = storage.dirname(os.fspath(path))
    shard_dir = storage.join(base, doc["shard_dir"])
    paths = [storage.join(shard_dir, s) for s in doc["shards"]]
    missing = [p for p in paths if not storage.as_path(p).is_file()]
    if missing:
      raise FileNotFoundError(f"subset {spec!r}: its shards are gone: {missing[:3]}")
    with storage.as_path(storage.join(base, doc["records"])).open("rb") as f:
      ids = np.load(f)
  else:
    paths = shard_paths(spec, cache_dir)
    shard_dir = storage.dirname(paths[0])
  data = grain.sources.ArrayRecordDataSource(paths)
  total = len(data)
  if total == 0:
    raise ValueError(f"shard spec {spec!r} holds no records")
  if total >= 2**32:
    raise ValueError("more than 2**32 records: index_shuffle takes 32-bit indices")
  if ids is not None and (len(ids) == 0 or ids.max() >= total):
    raise ValueError(f"subset {spec!r} does not match its shards ({total} records)")
  groups = weights = None
  mixture = dict(mixture.to_dict() if hasattr(mixture, "to_dict") else mixture or {})
  if isinstance(mixture.get("weights"), str):
    mixture["weights"] = parse_weights(mixture["weights"])
  if mixture.get("weights"):
    by = mixture.get("by", "modality")
    if by not in ("modality", "source"):
      raise ConfigError(f"config.data.mixture.by={by!r}: 'modality' or 'source'")
    if len({storage.dirname(p) for p in paths}) != 1:
      raise ConfigError("config.data.mixture needs the shards of one folder (its index.npz)")
    index = shards_lib.read_index(shard_dir)
    if len(index[by]) != total:
      raise ValueError(f"{shard_dir}/index.npz does not match its shards")
    members = ids if ids is not None else np.arange(total)
    table = [str(x) for x in index[f"{by}_names"]]
    groups, weights = [], []
    for name, w in sorted(dict(mixture["weights"]).items()):
      if name not in table:
        raise ConfigError(f"config.data.mixture.weights: no {by} named {name!r}; the shards "
                         f"hold {table}")
      if float(w) < 0:
        raise ConfigError(f"config.data.mixture.weights.{name}={w} must be >= 0")
      group = members[index[by][members] == table.index(name)]
      if float(w) > 0:
        if len(group) == 0:
          raise ConfigError(f"config.data.mixture.weights.{name}: the selection has no "
                           f"records of {by} {name!r}")
        groups.append(group)
        weights.append(float(w))
    if not groups:
      raise ConfigError("config.data.mixture.weights are all zero")
    weights = np.asarray(weights) / np.sum(weights)
  return Resolved(str(spec), paths, data, Selection(total, ids, groups, weights))


def make_named_subsets(shard_dir: str, names: list[str], catalog_name: str) -> list[str]:
  """Writes the catalog's named subsets (`[subsets.NAME]`; ["all"]: every one
  the shards can give, skipping those whose sources or modalities they lack)."""
  from data_pipeline.catalog import catalog as catalog_lib  # pylint: disable=import-outside-toplevel
  cat = catalog_lib.load(catalog_name)
  every = names == ["all"]
  unknown = [n for n in names if n not in cat.subsets and not every]
  if unknown:
    raise ValueError(f"--named: no subset {unknown} in catalog {cat.name}; it has "
                     f"{', '.join(cat.subsets)}")
  have = {str(x) for x in shards_lib.read_index(shard_dir)["source_names"]}
  paths = []
  for name in cat.subsets if every else names:
    s = cat.subsets[name]
    sources = s["sources"]
    if sources:  # the subset's sources this copy of the corpus has
      lacking = [x for x in sources if x not in have]
      sources = [x for x in sources if x in have]
      if lacking:
        print(f"subset {name}: the shards lack {', '.join(lacking)}")
      if not sources:
        if not every:
          raise ValueError(f"subset {name!r}: the shards hold none of its sources {s['sources']}")
        print(f"skipped subset {name}: the shards hold none of its sources")
        continue
    try:
      paths.append(make_subset(shard_dir, name, count=s.get("count"), modalities=s["modality"],
                               sources=sources, seed=int(s.get("seed", 0)),
                               stratify=s.get("stratify"), description=s["description"]))
    except ValueError as e:
      if not every:
        raise
      print(f"skipped subset {name}: {e}")
  return paths


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m data_pipeline.selection",
                              description="Write a subset (an index over existing shards).")
  p.add_argument("--shards", required=True,
                 help="folder written by data_pipeline.ingest (local or gs://)")
  p.add_argument("--name", help="the subset's name (with --count, --modality, --source)")
  p.add_argument("--named", help="a subset the catalog defines, e.g. 0.2M or us_only "
                 "(comma-separated; 'all': every one)")
  p.add_argument("--catalog", default="biovfm21m", help="catalog of --named")
  p.add_argument("--stratify", choices=["source"], help="draw --count per source")
  p.add_argument("--count", default=None, help="records: 200000, 200k, 0.2M, 0.25 or all")
  p.add_argument("--modality", action="append", help="keep this modality (repeatable)")
  p.add_argument("--source", action="append", help="keep this source (repeatable)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  if bool(a.name) == bool(a.named):
    p.error("give --name (with its filters) or --named, not both")
  try:
    paths = (make_named_subsets(a.shards, a.named.split(","), a.catalog) if a.named else
             [make_subset(a.shards, a.name, count=a.count, modalities=a.modality,
                          sources=a.source, seed=a.seed, stratify=a.stratify)])
  except (ValueError, FileNotFoundError) as e:
    p.error(str(e))
  for path in paths:
    doc = json.loads(storage.as_path(path).read_text())
    print(f"{path}: {doc['num_records']} of {doc['of_records']} records; "
          f"modalities {doc['modalities']}")


if __name__ == "__main__":
  main()
