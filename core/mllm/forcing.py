"""Make a model *generate* given assistant turns, token by token through the real ``generate`` loop.

For tests, benchmarks and demos of untrained models: unlike the hf policy's ``scripted_prefix`` (text put
into the prompt), the turns here come out of decoding, so batching, stop strings and the class score read
at the decoding step all run as with a trained model, at a trained model's cost per token. Only the choice
of token is forced; the logits the lm head computes (and the score reads) are the model's own.
"""

from __future__ import annotations

from transformers import LogitsProcessor


class ForcedTurns(LogitsProcessor):
    """``generate(logits_processor=[ForcedTurns(tokenizer, turns)])``: assistant turn ``i`` of every row is
    ``turns[i]`` (the last one repeats), tokenized as the tokenizer does. Which turn a row is at is read from
    its prompt (the number of assistant headers), so rows at different turns can share a batch."""

    def __init__(self, tokenizer, turns: list[str], header: str = "<|im_start|>assistant\n"):
        if not turns:
            raise ValueError("ForcedTurns needs at least one turn")
        self.turns = [tokenizer.encode(t, add_special_tokens=False) for t in turns]
        self.header = tokenizer.encode(header, add_special_tokens=False)
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._rows: list[tuple[list[int], int]] = []  # per row of the current call: its turn, where it starts
        self._last = None  # the ids of the previous step (to tell a new generate call)

    def __call__(self, input_ids, scores):
        import torch

        width = input_ids.shape[1]
        same_call = self._last is not None and self._last.shape == (input_ids.shape[0], width - 1)
        if not (same_call and torch.equal(input_ids[:, :-1], self._last)):  # a new generate call
            self._rows = [self._turn_start(row) for row in input_ids.tolist()]
        self._last = input_ids.clone()
        forced = torch.full_like(scores, float("-inf"))
        for b, (turn, start) in enumerate(self._rows):
            done = width - start
            forced[b, turn[done] if done < len(turn) else self.end] = 0.0
        return scores + forced

    def _turn_start(self, row: list[int]) -> tuple[list[int], int]:
        h = len(self.header)
        starts = [j + h for j in range(len(row) - h + 1) if row[j : j + h] == self.header]
        if not starts:
            raise ValueError("ForcedTurns: a row has no assistant header")
        return self.turns[min(len(starts) - 1, len(self.turns) - 1)], starts[-1]
