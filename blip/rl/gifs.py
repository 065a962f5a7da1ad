"""Animated GIFs of the agent playing (Pillow): one clip per (after game i, game j),
and a grid of all of them, row i = after learning game i, column j = game played."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CELL = 84  # grid cell size in pixels; clips are resized to it
PAD = 2


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


def grid_frames(clips: dict[tuple[int, int], list[np.ndarray]], n_games: int
                ) -> list[np.ndarray]:
    """Frames of the grid GIF: cell (i, j) plays clip ``clips[(i, j)]`` (held on its last
    frame once over), grey where game j was not seen yet after game i."""
    if not clips:
        return []
    length = max(len(c) for c in clips.values())
    size = n_games * (CELL + PAD) + PAD
    cells = {k: [_cell(f) for f in c] for k, c in clips.items() if c}
    out = []
    for t in range(length):
        canvas = np.full((size, size, 3), 40, dtype=np.uint8)
        for i in range(n_games):
            for j in range(n_games):
                y, x = PAD + i * (CELL + PAD), PAD + j * (CELL + PAD)
                clip = cells.get((i, j))
                if clip:
                    canvas[y:y + CELL, x:x + CELL] = clip[min(t, len(clip) - 1)]
                else:
                    canvas[y:y + CELL, x:x + CELL] = 90 if j > i else 20
        out.append(canvas)
    return out


__all__ = ["grid_frames", "write_gif"]
