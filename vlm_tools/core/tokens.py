"""Image-token bookkeeping in `input_ids`: placeholder runs per sample, shrinking them, re-padding batches."""

from __future__ import annotations

import torch

__all__ = ["padding_side", "assign_images", "shrink_placeholders"]


def padding_side(attention_mask: torch.Tensor) -> str:
    """'left' or 'right', read off the mask (a batch without padding counts as left-padded)."""
    if attention_mask.shape[1] and bool((attention_mask[:, 0] == 0).any()):
        return "left"
    if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def assign_images(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int,
                  tokens_per_image: list[int]) -> tuple[list[int], list[list[tuple[int, int, int]]]]:
    """Match the images (in batch order) to the placeholder runs of each sample.

    Returns:
        `(image_sample, spans)`: the sample of each image, and per sample `(start, length, image)` runs in
        `input_ids` coordinates.

    Raises:
        ValueError: the number of placeholder tokens does not match the images (names both counts).
    """
    is_img = (input_ids == image_token_id) & attention_mask.bool()
    per_sample = is_img.sum(1).tolist()
    total = sum(per_sample)
    if total != sum(tokens_per_image):
        raise ValueError(f"the prompts hold {total} image placeholder tokens ({per_sample} per sample) but the "
                         f"{len(tokens_per_image)} image(s) given need {sum(tokens_per_image)} "
                         f"({tokens_per_image} per image); check that each prompt has one placeholder per image")
    image_sample, spans, img = [], [], 0
    for s in range(input_ids.shape[0]):
        pos = torch.nonzero(is_img[s]).flatten().tolist()
        runs, cursor = [], 0
        while cursor < len(pos):
            if img >= len(tokens_per_image):
                raise ValueError(f"sample {s} has more image placeholders than images were given")
            n = tokens_per_image[img]
            seg = pos[cursor:cursor + n]
            if len(seg) != n or seg[-1] - seg[0] != n - 1:
                raise ValueError(f"sample {s}: image {img} needs a contiguous run of {n} placeholder tokens; "
                                 f"the number of images and placeholders does not match")
            runs.append((seg[0], n, img))
            image_sample.append(s)
            cursor += n
            img += 1
        spans.append(runs)
    if img != len(tokens_per_image):
        raise ValueError(f"{len(tokens_per_image)} images were given but the prompts hold placeholders for {img}")
    return image_sample, spans


def shrink_placeholders(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                        spans: list[list[tuple[int, int, int]]], new_lengths: list[int], pad_id: int,
                        side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                            list[list[tuple[int, int, int]]]]:
    """Shorten each image's placeholder run to `new_lengths[image]` and re-pad the batch on `side`.

    Returns:
        New `(input_ids, attention_mask, labels, spans)`; spans in the new coordinates.
    """
    rows_ids, rows_lab, new_spans = [], [], []
    for s in range(input_ids.shape[0]):
        keep = attention_mask[s].bool().clone()
        for start, n, img in spans[s]:
            keep[start + new_lengths[img]:start + n] = False
        ids = input_ids[s][keep]
        rows_ids.append(ids)
        rows_lab.append(labels[s][keep] if labels is not None else None)
        # positions of the kept runs inside the unpadded row
        offset = torch.cumsum(keep.long(), 0) - 1
        new_spans.append([(int(offset[start]), new_lengths[img], img) for start, _, img in spans[s]])
    width = max(len(r) for r in rows_ids)
    out_ids = input_ids.new_full((len(rows_ids), width), pad_id)
    out_mask = attention_mask.new_zeros((len(rows_ids), width))
    out_lab = labels.new_full((len(rows_ids), width), -100) if labels is not None else None
    for s, ids in enumerate(rows_ids):
        n = len(ids)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        out_ids[s, sl] = ids
        out_mask[s, sl] = 1
        if out_lab is not None:
            out_lab[s, sl] = rows_lab[s]
        shift = width - n if side == "left" else 0
        new_spans[s] = [(st + shift, n_, img) for st, n_, img in new_spans[s]]
    return out_ids, out_mask, out_lab, new_spans
