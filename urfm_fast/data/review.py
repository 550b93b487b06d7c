"""What a person looks at before a shard folder leaves the site: the review sheet (random images, the
blanked areas outlined in red, each labelled with its index line) and any one image at full size."""

import math
import os
import random

from PIL import Image, ImageDraw

from urfm_fast.data import shards

TILE = 320  # pixels per image on the sheet: large enough to read burned-in text that was missed


class ReviewError(ValueError):
    """Nothing to review, or no such image (one line)."""


def write_review(out, n, seed=None, tile=TILE):
    """PNG contact sheet of n random prepared images of a shard folder (index order, each scaled to fit
    tile x tile, labelled with its index line and frame), the blanked areas outlined in red (the
    scan-region crop is the black around the image) -> path of out/review.png."""
    recs = shards.read_index(out)
    if not recs:
        raise ReviewError(f"{out} holds no prepared images to review")
    pick = sorted(random.Random(seed).sample(range(len(recs)), min(n, len(recs))))
    cols = max(1, min(8, math.ceil(math.sqrt(len(pick)))))
    scale = [tile / max(recs[k]["h"], recs[k]["w"]) for k in pick]
    rows = [pick[i:i + cols] for i in range(0, len(pick), cols)]
    heights = [max(round(recs[k]["h"] * scale[pick.index(k)]) for k in row) + 16 for row in rows]
    sheet = Image.new("RGB", (cols * (tile + 4) + 4, sum(heights) + 4 * len(rows) + 4), (40, 40, 40))
    draw, maps, y0 = ImageDraw.Draw(sheet), {}, 4
    for row, height in zip(rows, heights):
        for c, k in enumerate(row):
            r, s, x0 = recs[k], scale[pick.index(k)], 4 + c * (tile + 4)
            img = Image.fromarray(shards.read_image(out, maps, r))
            sheet.paste(img.resize((max(1, round(r["w"] * s)), max(1, round(r["h"] * s)))).convert("RGB"), (x0, y0))
            _outline(draw, r.get("blank", []), s, x0, y0)
            draw.text((x0, y0 + height - 14), f"#{k} frame {r['frame']}", fill=(220, 220, 120))
        y0 += height + 4
    path = os.path.join(out, shards.REVIEW)
    sheet.save(path)
    return path


def _outline(draw, boxes, s=1.0, x0=0, y0=0):
    for by0, by1, bx0, bx1 in boxes:
        draw.rectangle((x0 + bx0 * s - 1, y0 + by0 * s - 1, x0 + bx1 * s, y0 + by1 * s), outline=(255, 40, 40))


def write_full(out, line):
    """One prepared image at its full stored size, blanked areas outlined: index line `line` (the
    number on its review-sheet tile) -> path of out/review-LINE.png."""
    recs = shards.read_index(out)
    if not 0 <= line < len(recs):
        raise ReviewError(f"{out} holds {len(recs)} images (index lines 0 to {len(recs) - 1}); no line {line}")
    r = recs[line]
    img = Image.fromarray(shards.read_image(out, {}, r)).convert("RGB")
    _outline(ImageDraw.Draw(img), r.get("blank", []))
    path = os.path.join(out, shards.review_name(line))
    img.save(path)
    return path
