"""The ingestion report a person reads: what went in, what was dropped and why.

`write_report` writes, into one folder, `report.md` and `report.html` (the same
content: counts per source, images per modality, the commonest reject reasons,
shards), `modalities.png` (a bar chart) and one `contact_<source>.png` per
source (a grid of sample thumbnails). Charts are drawn with PIL alone. Every
file is written under a temporary name and renamed, so a reader never sees half
a report. `SampleKeeper` picks the thumbnails from the image stream in bounded
memory.
"""
from __future__ import annotations

import hashlib
import heapq
import html
import io
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline import storage

THUMB = 96  # thumbnail longer side, pixels
BAR_ROW, BAR_TOP = 36, 56  # bar chart: row height and title band, pixels
COUNT_KEYS = ("inputs", "written", "rejected", "exact_duplicates", "near_duplicates")
_PALETTE = ((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188),
            (0, 172, 193), (255, 112, 67), (158, 157, 36), (92, 107, 192), (240, 98, 146))


# --- Samples ------------------------------------------------------------------

def thumbnail(pixels: np.ndarray, size: int = THUMB) -> np.ndarray:
  """uint8 (H, W) or (H, W, 3) pixels scaled down so the longer side is <= size."""
  a = np.asarray(pixels)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) \
      or 0 in a.shape:
    raise ValueError(f"need uint8 (H, W) or (H, W, 3) pixels, got {a.dtype} {a.shape}")
  h, w = a.shape[:2]
  if max(h, w) <= size:
    return a.copy()
  scale = size / max(h, w)
  new = (max(1, round(w * scale)), max(1, round(h * scale)))
  img = Image.fromarray(np.ascontiguousarray(a)).resize(new, Image.Resampling.BILINEAR,
                                                        reducing_gap=2.0)
  return np.asarray(img)


class SampleKeeper:
  """Keeps up to `per_source` thumbnails per source from a stream of images.

  Bottom-k sampling: each image gets a pseudo-random priority, a hash of
  (seed, source, key), and the `per_source` lowest stay. That is a uniform
  sample without replacement that depends only on which keys were offered, not
  on their order, so parallel or resumed runs pick the same images when keys
  are stable (e.g. path and slice index; by default the position in the
  source's stream). Only images that enter the sample are downscaled, and
  memory is per_source thumbnails (<= size x size x 3 bytes each) per source.
  """

  def __init__(self, per_source: int, seed: int = 0, size: int = THUMB):
    if per_source < 0 or size < 1:
      raise ValueError(f"need per_source >= 0 and size >= 1, got {per_source}, {size}")
    self.per_source, self.seed, self.size = per_source, seed, size
    self._heaps: dict[str, list] = {}  # max-heaps of (-priority, seq, key, thumb)
    self._seen: Counter = Counter()
    self._seq = 0

  def _priority(self, source: str, key: str) -> int:
    h = hashlib.blake2b(f"{self.seed}\0{source}\0{key}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")

  def offer(self, source: str, pixels: np.ndarray, key: str | None = None) -> bool:
    """Consider one image; True if it is in the sample for now."""
    key = str(self._seen[source]) if key is None else str(key)
    self._seen[source] += 1
    return self._push(source, self._priority(source, key), key, pixels)

  def _push(self, source, priority, key, pixels, *, small=False) -> bool:
    heap = self._heaps.setdefault(source, [])
    if len(heap) >= self.per_source and (not heap or priority >= -heap[0][0]):
      return False
    item = (-priority, self._seq, key, pixels if small else thumbnail(pixels, self.size))
    self._seq += 1
    if len(heap) < self.per_source:
      heapq.heappush(heap, item)
    else:
      heapq.heapreplace(heap, item)
    return True

  def seen(self, source: str) -> int:
    return self._seen[source]

  def samples(self) -> dict[str, list[np.ndarray]]:
    """{source: thumbnails}, each list in priority order (so order-independent)."""
    return {s: [t for *_, t in sorted(heap, key=lambda it: (-it[0], it[2]))]
            for s, heap in self._heaps.items()}

  def state(self) -> dict[str, np.ndarray]:
    """The sample as numpy arrays (npz-friendly), for `from_state` on resume."""
    items = [(s, -p, k, t) for s, heap in self._heaps.items() for p, _, k, t in heap]
    sources = sorted(set(self._seen) | set(self._heaps))
    return {
        "seed": np.array(self.seed, np.int64),
        "sources": np.array(sources, dtype=str),
        "seen": np.array([self._seen[s] for s in sources], np.int64),
        "item_source": np.array([sources.index(s) for s, *_ in items], np.int64),
        "item_priority": np.array([p for _, p, _, _ in items], np.uint64),
        "item_key": np.array([k for _, _, k, _ in items], dtype=str),
        "item_shape": np.array([t.shape + (1,) * (3 - t.ndim) for *_, t in items],
                               np.int64).reshape(-1, 3),
        "item_ndim": np.array([t.ndim for *_, t in items], np.int64),
        "pixels": (np.concatenate([t.reshape(-1) for *_, t in items]) if items
                   else np.zeros(0, np.uint8)),
    }

  @classmethod
  def from_state(cls, state: Mapping[str, np.ndarray], per_source: int,
                 size: int = THUMB) -> SampleKeeper:
    """The keeper that made `state` (same seed), to go on offering images."""
    keeper = cls(per_source, int(np.asarray(state["seed"])), size)
    sources = [str(s) for s in np.asarray(state["sources"]).reshape(-1)]
    keeper._seen.update(dict(zip(sources, np.asarray(state["seen"]).tolist())))
    flat, at = np.asarray(state["pixels"], np.uint8), 0
    for i, shape in enumerate(np.asarray(state["item_shape"]).tolist()):
      n = int(np.prod(shape))
      thumb = flat[at:at + n].reshape(shape[:int(state["item_ndim"][i])])
      at += n
      keeper._push(sources[int(state["item_source"][i])], int(state["item_priority"][i]),
                   str(state["item_key"][i]), thumb.copy(), small=True)
    return keeper


# --- Drawing ------------------------------------------------------------------

def _font(size: int):
  return ImageFont.load_default(size=size)  # Pillow's bundled font, no files needed


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "PNG", optimize=False)
  return buf.getvalue()


def _nice_step(top: float, ticks: int = 5) -> int:
  """A 1, 2 or 5 x 10^k step giving at most `ticks` intervals up to `top`."""
  step = 10 ** max(0, math.floor(math.log10(max(top, 1) / ticks)))
  for m in (1, 2, 5, 10):
    if top / (m * step) <= ticks:
      return m * step
  return 10 * step


def bar_chart(counts: Mapping[str, int], title: str = "Images written per modality",
              width: int = 1100, axis_label: str = "images written") -> Image.Image:
  """Horizontal bars, largest first, each labelled with its name, count and
  share, over a count axis with gridlines, for reading at a glance."""
  font, title_font = _font(18), _font(22)
  rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  total = sum(v for _, v in rows)
  texts = [f"{v:,} ({100 * v / total:.1f}%)" if total else f"{v:,}" for _, v in rows]
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label_w = max([probe.textlength(str(k), font=font) for k, _ in rows] + [40]) + 36
  count_w = max([probe.textlength(t, font=font) for t in texts] + [20]) + 16
  width = max(width, int(label_w + count_w + 200))
  row_h, top, axis_h = BAR_ROW, BAR_TOP, 70
  img = Image.new("RGB", (width, top + row_h * max(1, len(rows)) + axis_h), "white")
  draw = ImageDraw.Draw(img)
  draw.text((16, 14), title, fill="black", font=title_font)
  if not rows:
    draw.text((16, top + 8), "no data: no images written", fill=(110, 110, 110), font=font)
    return img
  span = width - label_w - count_w - 16
  top_count = max(v for _, v in rows) or 1
  bottom = top + row_h * len(rows)
  step = _nice_step(top_count)
  for tick in range(0, top_count + 1, step):  # gridlines and labelled ticks
    x = label_w + round(span * tick / top_count)
    draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
    draw.line([(x, bottom), (x, bottom + 6)], fill="black")
    draw.text((x, bottom + 8), f"{tick:,}", fill="black", font=_font(15), anchor="mt")
  draw.line([(label_w, bottom), (label_w + span, bottom)], fill="black")
  draw.text((label_w + span / 2, bottom + 32), axis_label, fill="black", font=font,
            anchor="mt")
  for i, ((name, value), text) in enumerate(zip(rows, texts)):
    y = top + i * row_h
    draw.text((label_w - 10, y + row_h / 2), str(name), fill="black", font=font, anchor="rm")
    length = round(span * value / top_count)
    if length:
      draw.rectangle([label_w, y + 5, label_w + length, y + row_h - 5],
                     fill=_PALETTE[i % len(_PALETTE)])
    draw.text((label_w + length + 8, y + row_h / 2), text, fill="black", font=font,
              anchor="lm")
  return img


def contact_sheet(name: str, thumbs: Sequence[np.ndarray], *, columns: int = 8,
                  size: int = THUMB, caption: str = "") -> Image.Image:
  """A grid of thumbnails under a header naming the source."""
  font = _font(14)
  pad, header = 4, 30
  cols = max(1, min(columns, len(thumbs)))
  rows = max(1, -(-len(thumbs) // cols))
  text = f"{name}{' - ' + caption if caption else ''}"
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  width = max(pad + cols * (size + pad), int(probe.textlength(text, font=font)) + 16)
  img = Image.new("RGB", (width, header + rows * (size + pad) + pad), (24, 24, 24))
  draw = ImageDraw.Draw(img)
  draw.text((8, header / 2), text, fill="white", font=font, anchor="lm")
  if not thumbs:
    draw.text((8, header + size / 2), "no samples", fill=(160, 160, 160), font=font,
              anchor="lm")
  for i, t in enumerate(thumbs):
    tile = Image.fromarray(np.ascontiguousarray(thumbnail(t, size))).convert("RGB")
    r, c = divmod(i, cols)
    x = pad + c * (size + pad) + (size - tile.width) // 2
    y = header + r * (size + pad) + (size - tile.height) // 2
    img.paste(tile, (x, y))
  return img


# --- The report ---------------------------------------------------------------

def _file_stem(name: str, taken: set[str]) -> str:
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "source"
  out, i = stem, 2
  while out.lower() in taken:
    out, i = f"{stem}-{i}", i + 1
  taken.add(out.lower())
  return out


def human_bytes(n: float) -> str:
  """1536 -> "1.5 KiB"."""
  if abs(n) < 1024:
    return f"{n:.0f} B"
  for unit in ("KiB", "MiB", "GiB", "TiB"):
    n /= 1024
    if abs(n) < 1024 or unit == "TiB":
      break
  return f"{n:.1f} {unit}"


def _reason_key(reject: Mapping[str, Any]) -> str:
  """The reason with the file's own path and name blanked, so reasons group."""
  reason, path = str(reject.get("reason", "")), str(reject.get("path", ""))
  for p in (path, os.path.basename(path)):
    if p:
      reason = reason.replace(p, "{file}")
  return " ".join(reason.split()) or "(no reason given)"


def _check_summary(summary: Mapping[str, Any]) -> None:
  sources = summary.get("sources")
  if not isinstance(sources, Mapping):
    raise ValueError("summary needs 'sources': {name: {counts...}}")
  for name, s in sources.items():
    missing = [k for k in COUNT_KEYS if k not in s]
    if missing:
      raise ValueError(f"summary['sources'][{name!r}] lacks {missing}")


def _blocks(summary: Mapping[str, Any], sheets: Mapping[str, str], top: int) -> list[tuple]:
  """The report as blocks, rendered to markdown and HTML alike."""
  sources = summary["sources"]
  modalities = dict(summary.get("modalities") or {})
  rejects = list(summary.get("rejects") or [])
  shards = dict(summary.get("shards") or {})
  out: list[tuple] = [("h1", summary.get("title") or "Ingestion report")]

  totals = {k: sum(int(s[k]) for s in sources.values()) for k in COUNT_KEYS}
  bad = [n for n, s in sources.items()
         if int(s["inputs"]) != sum(int(s[k]) for k in COUNT_KEYS[1:])]
  facts = [f"{totals['inputs']:,} inputs from {len(sources)} sources: {totals['written']:,} "
           f"written, {totals['rejected']:,} rejected, {totals['exact_duplicates']:,} exact "
           f"and {totals['near_duplicates']:,} near duplicates dropped."]
  if summary.get("near_threshold") is not None:
    facts.append(f"Near duplicates: pHash within {summary['near_threshold']} bits.")
  if summary.get("elapsed_s") is not None:
    facts.append(f"Took {float(summary['elapsed_s']):.0f} s.")
  facts.append("Counts reconcile (inputs = written + rejected + duplicates)." if not bad else
               f"COUNTS DO NOT RECONCILE for: {', '.join(bad)}.")
  out.append(("p", " ".join(facts)))

  out.append(("h2", "Sources"))
  header = ["Source", "Modality", "Inputs", "Written", "Rejected", "Exact dups", "Near dups"]
  rows = [[name, str(s.get("modality", "")), *(f"{int(s[k]):,}" for k in COUNT_KEYS)]
          for name, s in sources.items()]
  rows.append(["**Total**", "", *(f"{totals[k]:,}" for k in COUNT_KEYS)])
  align = "llrrrrr"
  if any("dedup" in s for s in sources.values()):  # which dedup each source got, and why
    header.append("Dedup")
    rows = [r + [str(s.get("dedup", ""))] for r, s in zip(rows, sources.values())] + [
        rows[-1] + [""]]
    align += "l"
  out.append(("table", header, rows, align))

  for t in summary.get("tables") or []:  # e.g. the catalog's per-source comparison
    out.append(("h2", t["title"]))
    if t.get("note"):
      out.append(("p", t["note"]))
    out.append(("table", t["header"], t["rows"], t["align"]))

  out.append(("h2", "Modalities"))
  written = sum(modalities.values())
  rows = [[m, f"{v:,}", f"{100 * v / written:.1f}%" if written else "-"]
          for m, v in sorted(modalities.items(), key=lambda kv: (-kv[1], kv[0]))]
  out.append(("table", ["Modality", "Written", "Share"], rows, "lrr"))
  out.append(("img", "Images written per modality", "modalities.png"))

  out.append(("h2", "Rejected inputs"))
  if rejects:
    groups: dict[str, list] = {}
    for r in rejects:
      g = groups.setdefault(_reason_key(r), [0, set(), str(r.get("path", ""))])
      g[0] += 1
      g[1].add(str(r.get("source", "")))
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    out.append(("p", f"{len(rejects):,} rejects listed, {len(groups):,} distinct reasons"
                     f"{f'; the {top} commonest' if len(groups) > top else ''}:"))
    out.append(("table", ["Reason", "Count", "Sources", "Example"],
                [[reason, f"{n:,}", ", ".join(sorted(srcs)), example]
                 for reason, (n, srcs, example) in ranked[:top]], "lrll"))
  else:
    out.append(("p", "None."))

  out.append(("h2", "Shards"))
  facts = []
  if "count" in shards:
    facts.append(f"{int(shards['count']):,} shards")
  if "bytes" in shards:
    facts.append(f"{human_bytes(int(shards['bytes']))} in all")
  sizes = [int(s) for s in shards.get("sizes") or []]
  if sizes:
    facts.append(f"shard sizes {human_bytes(min(sizes))} to {human_bytes(max(sizes))}, "
                 f"mean {human_bytes(sum(sizes) / len(sizes))}")
  out.append(("p", (", ".join(facts) + ".") if facts else "No shard information."))

  out.append(("h2", "Samples per source"))
  for name, file in sheets.items():
    out.append(("img", f"Samples of {name}", file))
  return out


def _md_cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[tuple]) -> str:
  lines = []
  for kind, *rest in blocks:
    if kind in ("h1", "h2"):
      lines += ["#" * int(kind[1]) + " " + rest[0], ""]
    elif kind == "p":
      lines += [rest[0], ""]
    elif kind == "table":
      header, rows, align = rest
      lines.append("| " + " | ".join(header) + " |")
      lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
      lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
      lines.append("")
    elif kind == "img":
      lines += [f"![{rest[0]}]({rest[1]})", ""]
  return "\n".join(lines)


def _html(blocks: list[tuple], title: str) -> str:
  def inline(text):  # the markdown we emit uses **bold** only
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(text)))

  body = []
  for kind, *rest in blocks:
    if kind in ("h1", "h2"):
      body.append(f"<{kind}>{inline(rest[0])}</{kind}>")
    elif kind == "p":
      body.append(f"<p>{inline(rest[0])}</p>")
    elif kind == "table":
      header, rows, align = rest
      body.append("<table>\n<tr>" + "".join(f"<th>{inline(h)}</th>" for h in header) + "</tr>")
      body += ["<tr>" + "".join(f'<td class="{a}">{inline(c)}</td>' for a, c in zip(align, row))
               + "</tr>" for row in rows]
      body.append("</table>")
    elif kind == "img":
      body.append(f'<p><img src="{html.escape(rest[1])}" alt="{html.escape(rest[0])}"></p>')
  style = ("body{font-family:sans-serif;margin:2em;max-width:70em}"
           "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px}"
           "td.r{text-align:right}")
  return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
          f"</title><style>{style}</style></head><body>\n" + "\n".join(body)
          + "\n</body></html>\n")


def file_names(sources: Sequence[str]) -> dict[str, str]:
  """{what: file name} of the files `write_report` writes for these sources
  (the ingestion records them as its own before writing them)."""
  taken: set[str] = set()
  names = {"markdown": "report.md", "html": "report.html", "modalities": "modalities.png"}
  names.update({f"contact:{s}": f"contact_{_file_stem(s, taken)}.png" for s in sources})
  return names


def write_report(summary: Mapping[str, Any], samples: Mapping[str, Sequence[np.ndarray]],
                 out_dir: str | os.PathLike, *, columns: int = 8, max_samples: int = 64,
                 top_reasons: int = 10) -> dict[str, str]:
  """Writes the report files into `out_dir`; returns {what: path}.

  `summary` (only "sources" is required):
    {"title": str,
     "sources": {name: {"inputs": int, "written": int, "rejected": int,
                        "exact_duplicates": int, "near_duplicates": int,
                        "modality": str, "dedup": str}},   # in the order to show
     "modalities": {modality: images written},
     "rejects": [{"path": str, "reason": str, "source": str}, ...],
     "shards": {"count": int, "bytes": int, "sizes": [bytes of each shard]},
     "near_threshold": int | None, "elapsed_s": float,
     "tables": [{"title": str, "note": str, "header": [str], "rows": [[str]],
                 "align": "lr..."}]}          # more tables, after the sources
  A source whose inputs differ from written + rejected + duplicates is named
  in the report. Reasons are grouped after blanking the file's own path.
  `samples`: {source: uint8 images} (e.g. `SampleKeeper.samples()`); the first
  `max_samples` of each go on its contact sheet.

  Returns keys "markdown", "html", "modalities" and "contact:<source>" for each
  source of the summary or the samples (sheet `contact_<source>.png`, the name
  made filename-safe).
  """
  _check_summary(summary)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  names = list(summary["sources"]) + [s for s in samples if s not in summary["sources"]]
  paths = {k: os.path.join(out_dir, f) for k, f in file_names(names).items()}
  storage.write_bytes_atomic(paths["modalities"],
                             _png(bar_chart(summary.get("modalities") or {})))
  sheets = {}
  for name in names:
    thumbs = list(samples.get(name, ()))[:max_samples]
    written = summary["sources"].get(name, {}).get("written")
    caption = f"{len(thumbs)} samples" + (f" of {int(written):,} written" if written is not None
                                          else "")
    path = paths[f"contact:{name}"]
    storage.write_bytes_atomic(
        path, _png(contact_sheet(name, thumbs, columns=columns, caption=caption)))
    sheets[name] = os.path.basename(path)

  blocks = _blocks(summary, sheets, top_reasons)
  title = summary.get("title") or "Ingestion report"
  storage.write_bytes_atomic(paths["markdown"], _markdown(blocks).encode())
  storage.write_bytes_atomic(paths["html"], _html(blocks, title).encode())
  return paths
