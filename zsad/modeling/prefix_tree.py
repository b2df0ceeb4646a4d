"""Prompts that start alike, packed as prefix trees so a causal text encoder computes each shared start once.

Under CLIP's causal mask a token's hidden states depend only on the tokens before it, so prompts that share their
first k tokens ("a photo of a damaged ...", "a photo of a broken ...") share those tokens' hidden states exactly.
A row holds the distinct prefixes of several prompts as tree nodes (parents before children); each node attends
to itself and its ancestors, sits at its depth as position, and a prompt's feature is read at its last node.
The templates x states ensemble of a class name (420 prompts) shrinks to about 45% of its tokens this way.
Written by hand: transformers' masks cover causal, padded and packed sequences, not trees.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class PrefixTreeRow:
    """Nodes (token id, parent index or -1) of one packed row and the last node of each prompt in it."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    last_node: dict[int, int] = field(default_factory=dict)  # prompt index -> node index
    _children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def new_nodes(self, sequence: list[int]) -> int:
        """How many nodes ``sequence`` would add: those after its longest prefix already in the row."""
        node = -1
        for depth, token in enumerate(sequence):
            node = self._children.get((node, token))
            if node is None:
                return len(sequence) - depth
        return 0

    def add(self, prompt: int, sequence: list[int]) -> None:
        node = -1
        for token in sequence:
            child = self._children.get((node, token))
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self._children[(node, token)] = child
            node = child
        self.last_node[prompt] = node

    def depths(self) -> list[int]:
        """Each node's position in its prompts (the root token at 0)."""
        depths = []
        for parent in self.parents:
            depths.append(depths[parent] + 1 if parent >= 0 else 0)
        return depths

    def ancestry(self, size: int) -> torch.Tensor:
        """(size, size) bool: node i may attend to node j (j is i or an ancestor of i); padding nodes see themselves."""
        allowed = torch.eye(size, dtype=torch.bool)
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                allowed[node] |= allowed[parent]
        return allowed


def pack_prefix_trees(sequences: list[list[int]], max_nodes: int) -> list[PrefixTreeRow]:
    """Rows of at most ``max_nodes`` nodes (a longer prompt gets a row of its own), filled in token order so that
    prompts sharing a start land in the same row; every prompt is in exactly one row."""
    rows = [PrefixTreeRow()]
    for prompt in sorted(range(len(sequences)), key=sequences.__getitem__):
        sequence = sequences[prompt]
        if len(rows[-1]) and len(rows[-1]) + rows[-1].new_nodes(sequence) > max_nodes:
            rows.append(PrefixTreeRow())
        rows[-1].add(prompt, sequence)
    return [row for row in rows if len(row)]
