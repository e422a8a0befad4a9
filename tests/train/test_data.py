"""Training data (:mod:`train.data`): local text files, refused folders and files, and a data order
that depends on the seed only and resumes at its position, also when read ahead."""

from __future__ import annotations

import pytest
import torch

from train.data import Prefetched, ShuffledWindows


def test_a_data_folder_without_text_files_and_a_malformed_jsonl_are_refused(tmp_path, tiny_argv):
    from train import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt or .jsonl file"):
        main(tiny_argv(tmp_path / "run", data=tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object with a 'text' field"):
        main(tiny_argv(tmp_path / "run", data=tmp_path / "bad.jsonl"))


def test_local_text_files_train(run_tiny, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(" ".join(f"word{j % 50} and more words" for j in range(400 + i)))
    records = run_tiny("run", "adamw", data=corpus, val_fraction=0.25)
    assert records[-1]["loss"] < records[0]["loss"]


def test_the_data_order_depends_on_the_seed_only_and_resumes_at_its_position():
    tokens = torch.arange(40 * 8, dtype=torch.int32)  # 40 windows of 8 tokens

    def stream(seed: int, rank: int = 0, world: int = 1) -> ShuffledWindows:
        return ShuffledWindows(tokens, seq_len=8, batch_size=3, seed=seed, rank=rank, world=world)

    whole = stream(0)
    batches = [whole.next_batch() for _ in range(30)]  # 90 windows: past two epoch boundaries
    starts = torch.cat(batches)[:, 0]
    first, second = starts[:40], starts[40:80]  # each epoch visits every window once, in a new order
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(0, 320, 8))
    assert not torch.equal(first, second)

    resumed = stream(0)
    resumed.load_state_dict({"position": 3 * 17})
    assert all(torch.equal(resumed.next_batch(), b) for b in batches[17:])
    assert not torch.equal(stream(1).next_batch(), batches[0])

    ranks = [stream(0, rank, 2) for rank in (0, 1)]  # two ranks split one global batch of 6 windows
    global_order = stream(0, 0, 1)
    global_order.batch_size = 6
    assert torch.equal(torch.cat([r.next_batch() for r in ranks]), global_order.next_batch())


def test_read_ahead_hands_out_the_same_batches_and_resumes_at_the_batches_handed_out():
    tokens = torch.arange(40 * 8, dtype=torch.int32)

    def stream() -> ShuffledWindows:
        return ShuffledWindows(tokens, seq_len=8, batch_size=3, seed=0, rank=0, world=1)

    plain = stream()
    expected = [plain.next_batch() for _ in range(12)]
    ahead = Prefetched(stream(), "cpu", depth=2)
    got = [ahead.next_batch() for _ in range(5)]
    saved = ahead.state_dict()
    assert saved == {"position": 15}  # what was handed out, whatever the thread has read ahead
    ahead.close()  # dropped read-ahead: the next batch is still the sixth
    got += [ahead.next_batch() for _ in range(3)]
    resumed = Prefetched(stream(), "cpu")
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(got, expected[:8]))
    assert all(torch.equal(resumed.next_batch(), b) for b in expected[5:12])
    ahead.close()
    resumed.close()
