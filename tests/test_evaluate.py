"""Retrieval metrics, accuracy matrix, average accuracy, both forgetting definitions, the modality gap (evaluate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stella_cli.evaluate import (accuracy_matrix, average_accuracy, pair_ranks, forgetting_as_coded,
                                 forgetting_conventional, modality_gap, recall_at, retrieval_scores, summarize,
                                 true_pair_ranks, write_results, write_task_result)


def test_ranks_on_a_hand_built_gallery():
    sim = torch.tensor([[0.9, 0.1, 0.2],   # true pair best -> rank 0
                        [0.8, 0.5, 0.6],   # two candidates above 0.5 -> rank 2
                        [0.1, 0.7, 0.3]])  # one above -> rank 1
    assert true_pair_ranks(sim).tolist() == [0, 2, 1]
    assert true_pair_ranks(sim.T).tolist() == [0, 1, 1]  # columns: 0.7 > 0.5, 0.6 > 0.3
    m = recall_at(true_pair_ranks(sim), [1, 2, 5])
    assert m == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@5": 100.0, "MedR": 2.0})


def test_ties_count_against_the_query():
    collapsed = torch.ones(4, 4)  # every candidate equally similar
    assert true_pair_ranks(collapsed).tolist() == [3, 3, 3, 3]
    assert recall_at(true_pair_ranks(collapsed), [1])["R@1"] == 0.0


def test_retrieval_scores_equal_a_brute_force_ranking():
    g = torch.Generator().manual_seed(0)
    z_a = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    z_v = F.normalize(z_a + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    task = torch.arange(30) % 3
    scores = retrieval_scores(z_a, z_v, task, ["t0", "t1", "t2"], [1, 5, 10])
    sim = z_a @ z_v.T
    for direction, s in (("a2v", sim), ("v2a", sim.T)):
        for k_task in range(3):
            ranks = []
            for i in torch.nonzero(task == k_task).flatten().tolist():
                order = torch.argsort(s[i], descending=True).tolist()
                ranks.append(order.index(i))  # queries of task k against the whole gallery
            for k in (1, 5, 10):
                expected = 100.0 * sum(r < k for r in ranks) / len(ranks)
                assert scores[direction][f"t{k_task}"][f"R@{k}"] == pytest.approx(expected)
    assert 0 < scores["a2v"]["all"]["R@1"] < scores["a2v"]["all"]["R@10"] <= 100


def history_from(matrix):
    return [{"after_task": f"t{l}", "scores": {d: {f"t{k}": {"R@1": matrix[l][k]} for k in range(len(row))}
                                                for d in ("a2v", "v2a")}} for l, row in enumerate(matrix)]


def test_average_accuracy_and_both_forgetting_definitions():
    # a[0][1] = 15: task 1 scored higher before it was learnt than after; only F_as_coded may count that
    a = [[10.0, 15.0, 1.0],
         [6.0, 12.0, 3.0],
         [5.0, 7.0, 11.0]]
    assert average_accuracy(a) == pytest.approx((5 + 7 + 11) / 3)
    # conventional: k=0: max(10, 6) - 5 = 5; k=1: max over l >= 1 only: 12 - 7 = 5  -> 10 / 2
    # (every checkpoint for k < T would give (5 + 15 - 7) / 2 = 6.5)
    assert forgetting_conventional(a) == pytest.approx(5.0)
    # as coded: k=0: max(10,6)-5=5; k=1: max(15,12)-7=8; k=2 (the last task): max(1,3)-11=-8 -> 5 / 2
    assert forgetting_as_coded(a) == pytest.approx(2.5)
    assert forgetting_conventional([[3.0]]) is None and forgetting_as_coded([[3.0]]) is None
    history = history_from(a)
    assert accuracy_matrix(history, ["t0", "t1", "t2"], "a2v", "R@1") == a


def test_write_results_files(tmp_path):
    a = [[10.0, 2.0], [6.0, 12.0]]
    summary = write_results(tmp_path, history_from(a), ["t0", "t1"], [1])
    assert summary["a2v"]["R@1"] == {"A": 9.0, "F": 4.0, "F_as_coded": pytest.approx(4.0 + (2.0 - 12.0))}
    assert summary["v2a"]["avg"]["A"] == 9.0
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert saved["tasks"] == ["t0", "t1"] and len(saved["rows"]) == 2
    assert saved["task"] == "retrieval" and saved["checkpoint"] is None
    assert saved["metrics"]["a2v R@1 A"] == 9.0 and saved["metrics"]["a2v R@1 F"] == 4.0
    assert (tmp_path / "retrieval.md").read_text() == (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["a2v"]["R@1"]["A"] == 9.0
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0].startswith("| metric | a2v A | a2v F |") and md[2].startswith("| R@1 | 9.00 | 4.00 | -6.00 |")
    assert (tmp_path / "summary.csv").read_text().splitlines()[1] == "R@1,9.00,4.00,-6.00,9.00,4.00,-6.00"
    # a multitask run has one row over all tasks: A only
    single = summarize(history_from([[4.0, 6.0]]), ["t0", "t1"], [1])
    assert single["a2v"]["R@1"] == {"A": 5.0, "F": None, "F_as_coded": None}


def test_median_rank_averages_the_two_middle_ranks():
    ranks = torch.tensor([0, 3, 1, 6])  # sorted 0, 1, 3, 6: middle 1 and 3 -> 2, plus 1 (1-based)
    assert recall_at(ranks, [1])["MedR"] == 3.0
    assert recall_at(torch.tensor([4, 0, 2]), [1])["MedR"] == 3.0  # odd count: the middle one
    assert recall_at(torch.tensor([5, 2]), [1])["MedR"] == pytest.approx(1 + np.median([5, 2]))


def test_tiled_ranks_equal_the_full_matrix_with_ties():
    g = torch.Generator().manual_seed(1)
    z_a = F.normalize(torch.randn(37, 6, generator=g), dim=-1)
    z_v = F.normalize(z_a + torch.randn(37, 6, generator=g), dim=-1)
    z_v[5] = z_v[6]  # two identical candidates: a tie at row 5 or 6 counts against the query
    z_a[9] = z_a[10]
    sim = z_a @ z_v.T
    for chunk in (1, 4, 37, 100):
        a2v, v2a = pair_ranks(z_a, z_v, chunk)
        assert torch.equal(a2v, true_pair_ranks(sim)) and torch.equal(v2a, true_pair_ranks(sim.T))
    assert pair_ranks(z_a, z_v, 4)[0][5].item() == true_pair_ranks(sim)[5].item() >= 1  # the tie counts
    collapsed = torch.ones(5, 3) / 3 ** 0.5
    assert [r.tolist() for r in pair_ranks(collapsed, collapsed, 2)] == [[4] * 5, [4] * 5]


def test_task_result_files(tmp_path):
    result = {"task": "demo", "checkpoint": "c.pt", "recipe": "r.yaml", "command": "stella eval",
              "metrics": {"acc": 50.0}}
    write_task_result(tmp_path, result, [["metric", "value"], ["acc", "50.00"]])
    assert json.loads((tmp_path / "demo.json").read_text()) == result
    assert (tmp_path / "demo.csv").read_text().splitlines() == ["metric,value", "acc,50.00"]
    assert (tmp_path / "demo.md").read_text().splitlines()[2] == "| acc | 50.00 |"
    with pytest.raises(KeyError):
        write_task_result(tmp_path, {"task": "x", "metrics": {}}, [["a"]])


def test_modality_gap_on_hand_made_embeddings():
    """Two unit vectors per modality, on opposite sides: mu_a = (1/2, 1/2), mu_v = -mu_a, so gap = |(1, 1)| = sqrt 2
    and each spread = sqrt(1 - |mu|^2) = sqrt(1/2)."""
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gap = modality_gap(z_a, -z_a)
    assert gap == pytest.approx({"gap": 2 ** 0.5, "spread_a": 0.5 ** 0.5, "spread_v": 0.5 ** 0.5}, abs=1e-12)
    assert modality_gap(z_a, z_a)["gap"] == 0.0  # one cloud: no gap


def test_modality_gap_normalises_and_spread_is_the_rms_distance_to_the_centroid():
    """Unnormalised rows in 3-d. Audio (3, 0, 0), (0, 0, 2), (1, 0, 0) -> unit e1, e3, e1: mu_a = (2/3, 0, 1/3), squared
    distances to it 2/9, 8/9, 2/9, so spread_a = sqrt(4/9) = 2/3 (a mean distance would give 0.629). Video (0, 4, 0),
    (0, 2, 0), (0, 7, 0) -> e2 three times: mu_v = e2, spread_v = 0. gap = |(2/3, -1, 1/3)| = sqrt(14/9)."""
    z_a = torch.tensor([[3.0, 0, 0], [0, 0, 2.0], [1.0, 0, 0]])
    z_v = torch.tensor([[0, 4.0, 0], [0, 2.0, 0], [0, 7.0, 0]])
    gap = modality_gap(z_a, z_v)
    assert gap == pytest.approx({"gap": (14 / 9) ** 0.5, "spread_a": 2 / 3, "spread_v": 0.0}, abs=1e-12)
    assert modality_gap(z_v, z_a) == pytest.approx({"gap": (14 / 9) ** 0.5, "spread_a": 0.0, "spread_v": 2 / 3})


# ----------------------------------------------------------------------------------------------------------
# the paired t-interval over seeds (stella report)


def test_t_quantiles_equal_the_tabulated_values():
    """Two-sided 95% quantiles of Student's t (any statistics table; scipy.stats.t.ppf(0.975, df))."""
    from stella_cli.evaluate import t_quantile, t_within

    tabulated = {1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263, 4: 2.776445105197799,
                 5: 2.570581835636314, 9: 2.262157162798205, 10: 2.228138851986274, 30: 2.042272456301238}
    for df, t in tabulated.items():
        assert t_quantile(0.95, df) == pytest.approx(t, rel=1e-10), df
    assert t_quantile(0.99, 4) == pytest.approx(4.604094871415897, rel=1e-10)
    assert t_within(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 2 atan(1) / pi
    assert t_within(2 ** 0.5, 2) == pytest.approx(0.5 ** 0.5)  # df 2: t / sqrt(2 + t²)


def test_paired_difference_on_hand_made_numbers():
    """Differences 1, 2, 3: mean 2, sd 1, half-width t(0.95, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138."""
    from stella_cli.evaluate import paired_difference

    mean, low, high, n = paired_difference([41.0, 44.0, 47.0], [40.0, 42.0, 44.0])
    assert (mean, n) == (2.0, 3)
    assert (low, high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # two seeds: differences 7 and 10 -> mean 8.5, sd 3/sqrt(2), half 12.706205 * 1.5 = 19.059307
    assert paired_difference([52.0, 50.0], [45.0, 40.0])[1:3] == pytest.approx((8.5 - 19.059307, 8.5 + 19.059307))
    assert paired_difference([1.0], [0.0]) is None  # one seed: no interval
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([1.0, 2.0], [1.0])
