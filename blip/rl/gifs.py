"""Animated GIFs of the agent playing (Pillow): one clip per (after game i, game j),
and a grid of all of them, row i = after learning game i, column j = game played."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CELL = 84  # grid cell size in pixels; clips are resized to it
PAD = 2
LABEL_H = 14  # the strip above the grid holding the "game j" column labels


def _pil():  # noqa: ANN202
    from PIL import Image

    return Image


def write_gif(frames: list[np.ndarray], path: str | Path, fps: int = 15) -> None:
    """RGB uint8 frames -> an endlessly looping GIF (nothing written for no frames)."""
    if not frames:
        return
    Image = _pil()
    imgs = [Image.fromarray(f) for f in frames]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".gif.tmp")
    imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:],
                 duration=int(1000 / fps), loop=0)
    tmp.replace(path)  # atomic: a killed run leaves the old GIF or the new one


def _cell(frame: np.ndarray) -> np.ndarray:
    Image = _pil()
    img = Image.fromarray(frame).resize((CELL, CELL), Image.NEAREST)
    return np.asarray(img)


def _labelled_canvas(n_games: int, games: list[str] | None) -> tuple[np.ndarray, int]:
    """The grid's background with "after game i" left of each row and "game j" above each
    column; returns it and the x where the first column starts."""
    from PIL import ImageDraw

    Image = _pil()
    rows = [f"after game {i}" for i in range(n_games)]
    cols = [f"game {j}" if games is None else f"{j}: {games[j]}" for j in range(n_games)]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = PAD + max(int(draw.textlength(r)) for r in rows) + 2 * PAD
    side = n_games * (CELL + PAD) + PAD
    img = Image.new("RGB", (left + side, LABEL_H + side), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(rows):  # vertically centred on row i
        draw.text((PAD, LABEL_H + PAD + i * (CELL + PAD) + CELL // 2 - 5), text,
                  fill=(235, 235, 235))
    for j, text in enumerate(cols):  # centred over column j, clipped to the cell
        text = text[: CELL // 6]
        x = left + PAD + j * (CELL + PAD) + (CELL - int(draw.textlength(text))) // 2
        draw.text((x, 2), text, fill=(235, 235, 235))
    return np.asarray(img).copy(), left


def grid_frames(clips: dict[tuple[int, int], list[np.ndarray]], n_games: int,
                games: list[str] | None = None) -> list[np.ndarray]:
    """Frames of the grid GIF: cell (i, j) plays clip ``clips[(i, j)]`` (held on its last
    frame once over), grey where game j was not seen yet after game i. Rows are labelled
    "after game i", columns "game j" (or "j: name" when ``games`` names them)."""
    if not clips:
        return []
    length = max(len(c) for c in clips.values())
    base, left = _labelled_canvas(n_games, games)
    cells = {k: [_cell(f) for f in c] for k, c in clips.items() if c}
    out = []
    for t in range(length):
        canvas = base.copy()
        for i in range(n_games):
            for j in range(n_games):
                y, x = LABEL_H + PAD + i * (CELL + PAD), left + PAD + j * (CELL + PAD)
                clip = cells.get((i, j))
                if clip:
                    canvas[y:y + CELL, x:x + CELL] = clip[min(t, len(clip) - 1)]
                else:
                    canvas[y:y + CELL, x:x + CELL] = 90 if j > i else 20
        out.append(canvas)
    return out


__all__ = ["grid_frames", "write_gif"]
