"""Prompt prefix trees: packing by hand, and encoding equal to one prompt at a time."""

import random

import torch

from zsad.modeling import clip_backbone
from zsad.modeling.prefix_tree import pack_prefix_trees
from zsad.modeling.prompting import STATE_WORDS, state_prompts


def _path(row, node):
    tokens = []
    while node >= 0:
        tokens.append(row.tokens[node])
        node = row.parents[node]
    return tokens[::-1]


def test_shared_starts_become_one_node_each():
    (row,) = pack_prefix_trees([[6], [1, 2, 4], [1, 5], [1, 2, 3]], max_nodes=10)
    assert row.tokens == [1, 2, 3, 4, 5, 6]  # in token order: 1 2 3, then 4 under 2, 5 under 1, 6 a new root
    assert row.parents == [-1, 0, 1, 1, 0, -1]
    assert row.depths() == [0, 1, 2, 2, 1, 0]
    assert row.last_node == {3: 2, 1: 3, 2: 4, 0: 5}
    allowed = row.ancestry(8)
    assert allowed[3].nonzero().flatten().tolist() == [0, 1, 3]  # token 4 sees 1, 2 and itself, not its sibling 3
    assert allowed[5].nonzero().flatten().tolist() == [5]
    assert allowed[7].nonzero().flatten().tolist() == [7]  # padding sees only itself (no empty softmax row)


def test_rows_stay_within_the_node_budget_and_hold_every_prompt_once():
    rng = random.Random(0)
    sequences = [[rng.randrange(4) for _ in range(rng.randrange(1, 7))] for _ in range(60)] + [list(range(20))]
    rows = pack_prefix_trees(sequences, max_nodes=12)
    assert len(rows) > 1
    assert all(len(row) <= 12 or len(row.last_node) == 1 for row in rows)  # only a prompt longer than 12 exceeds
    placed = [prompt for row in rows for prompt in row.last_node]
    assert sorted(placed) == list(range(len(sequences)))
    for row in rows:
        for prompt, node in row.last_node.items():
            assert _path(row, node) == sequences[prompt]
    assert sum(map(len, rows)) < sum(map(len, sequences))  # shared starts were computed once


def test_encoded_trees_equal_each_prompt_encoded_alone(tiny_backbone, monkeypatch):
    texts = [prompt for states in STATE_WORDS for prompt in state_prompts("metal nut", states)][::7] + ["a pill."]
    alone = torch.cat([tiny_backbone.encode_text(tiny_backbone.tokenize([text])) for text in texts])
    monkeypatch.setattr(clip_backbone, "PROMPT_TREE_NODES", 24)  # several rows, several chunks
    torch.testing.assert_close(tiny_backbone.encode_prompts(texts, 64), alone, rtol=0, atol=2e-6)
