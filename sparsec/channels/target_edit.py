"""Rewrite a Reshape's target after a channel cut on its last axis (`TargetCut`, found by
`reshape_target`): the last entry becomes the kept count. A Concat or constant that other nodes also
read is copied first (fresh names), so a target shared across layers (dynamo dedups them) changes for
this Reshape alone."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx

from sparsec.channels.channel_state import TargetCut


def cut_target(editor: Any, a: TargetCut, keep: np.ndarray) -> None:
    """Set the target's last entry to `keep.sum()` (`editor`: prune_channels' _Editor)."""
    reshape = editor.node(a)
    holder = reshape if a.concat is None else _own_concat(editor, reshape, a.concat)
    k = 1 if a.concat is None else a.input
    old = holder.input[k]
    tensor = editor._tensor(holder, k)
    if holder.input[k] != old:  # got its own copy: a later edit may change the original in place
        editor.index.consumers[old] = [n for n in editor.index.consumers[old] if n is not holder]
    values = np.array(editor.ctx.store.read(tensor))
    values.reshape(-1)[-1] = int(keep.sum())
    editor.ctx.store.write(tensor, values)


def _own_concat(editor: Any, reshape: onnx.NodeProto, concat_id: str) -> onnx.NodeProto:
    """The Concat building `reshape`'s target, copied (inserted after it) when something else reads it."""
    concat = editor.by_id[concat_id]
    out = concat.output[0]
    readers = editor.index.consumers.get(out, [])
    if len(readers) <= 1 and out not in editor.index.graph_outputs:
        return concat
    clone = copy.deepcopy(concat)
    clone.name = editor.names(f"{concat.name or 'Concat'}__pruned")
    clone.output[0] = editor.names(f"{out}__pruned")
    reshape.input[1] = clone.output[0]
    editor.index.consumers[out] = [n for n in readers if n is not reshape]
    editor.index.consumers[clone.output[0]] = [reshape]
    for name in clone.input:  # the copy reads the same pieces: they are shared now
        editor.index.consumers[name].append(clone)
    editor.index.producer[clone.output[0]] = clone
    editor.inserts.append((concat_id, clone))
    return clone
