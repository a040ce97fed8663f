"""Paired significance tests, Holm's correction and the bootstrap interval, against values computed by hand."""

import itertools
import math
import random

import pytest

from retrieval.significance import bootstrap_ci, holm_adjust, paired_randomization_test, paired_t_test


def _scores(values, prefix="q"):
    return {f"{prefix}{i}": v for i, v in enumerate(values)}


def _against_zero(differences):
    """Scores of a and b whose per-query differences a - b are ``differences``."""
    return _scores(differences), _scores([0.0] * len(differences))


# --- paired t-test -------------------------------------------------------------------------------------------

def test_t_test_identical_scores_give_one():
    a = _scores([0.1, 0.5, 0.9, 0.3, 0.0])
    assert paired_t_test(a, dict(a)) == 1.0
    # scipy itself gives nan here; the function must not
    assert paired_t_test(_scores([0.0] * 5), _scores([0.0] * 5)) == 1.0


def test_t_test_df1_matches_closed_form():
    # Differences (3, 1): mean 2, sd sqrt(((3-2)^2 + (1-2)^2) / 1) = sqrt(2), se = sqrt(2)/sqrt(2) = 1, t = 2.
    # Student t with 1 df is Cauchy: two-sided p = 1 - (2/pi) atan(|t|) = 1 - (2/pi) atan(2) = 0.29517...
    a, b = _scores([3.5, 1.25]), _scores([0.5, 0.25])
    assert paired_t_test(a, b) == pytest.approx(1 - 2 / math.pi * math.atan(2), rel=1e-12)
    assert paired_t_test(b, a) == pytest.approx(1 - 2 / math.pi * math.atan(2), rel=1e-12)  # two-sided


def test_t_test_df2_matches_closed_form_and_pairs_by_query_id():
    # Differences (1, 2, 3): mean 2, sd sqrt((1 + 0 + 1) / 2) = 1, se = 1/sqrt(3), t = 2 sqrt(3).
    # Student t with 2 df: two-sided p = 1 - |t| / sqrt(2 + t^2) = 1 - 2 sqrt(3) / sqrt(14) = 0.07417...
    expected = 1 - 2 * math.sqrt(3) / math.sqrt(14)
    a = {"q1": 1.5, "q2": 2.5, "q3": 3.5}
    b = {"q3": 0.5, "q1": 0.5, "q2": 0.5}  # other insertion order: pairing is by id
    assert paired_t_test(a, b) == pytest.approx(expected, rel=1e-12)


def test_t_test_df3_matches_closed_form():
    # Differences (0, 0, 1/2, 1/2): mean 1/4, sd sqrt((2 * 1/16 + 2 * 1/16) / 3) = 1/sqrt(12),
    # se = 1/sqrt(48) = 1/(4 sqrt(3)), t = sqrt(3). Student t with 3 df, theta = atan(t / sqrt(3)) = pi/4:
    # two-sided p = 1 - (2/pi)(theta + sin(theta) cos(theta)) = 1 - (2/pi)(pi/4 + 1/2) = 1/2 - 1/pi = 0.18169...
    assert paired_t_test(*_against_zero([0.0, 0.0, 0.5, 0.5])) == pytest.approx(0.5 - 1 / math.pi, rel=1e-12)


def test_t_test_clearly_better_system_is_significant():
    rng = random.Random(0)
    base = [rng.uniform(0.2, 0.6) for _ in range(50)]
    better = [b + 0.2 + rng.uniform(-0.05, 0.05) for b in base]
    p = paired_t_test(_scores(better), _scores(base))
    assert p < 0.01
    assert paired_t_test(_scores(base), _scores(better)) == pytest.approx(p)  # two-sided: symmetric


def test_t_test_noise_is_not_significant():
    a = _scores([0.5, 0.4, 0.6, 0.5])
    b = _scores([0.4, 0.5, 0.5, 0.6])  # differences +0.1 -0.1 +0.1 -0.1: mean 0, t = 0
    assert paired_t_test(a, b) == pytest.approx(1.0)


def test_t_test_only_common_queries_are_used():
    # Common differences (1, 2, 3) as in the df = 2 case above; the unshared queries must not count.
    a = {"q1": 1.0, "q2": 2.0, "q3": 3.0, "only_a": 0.0}
    b = {"q1": 0.0, "q2": 0.0, "q3": 0.0, "only_b1": 1.0, "only_b2": 1.0}
    assert paired_t_test(a, b) == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-12)


def test_t_test_identical_on_common_queries_gives_one_even_if_others_differ():
    a = {"q1": 0.3, "q2": 0.4, "x": 1.0}
    b = {"q1": 0.3, "q2": 0.4, "y": 0.0}
    assert paired_t_test(a, b) == 1.0


def test_t_test_fewer_than_two_common_queries_give_one():
    assert paired_t_test({}, {}) == 1.0
    assert paired_t_test({"q1": 1.0}, {"q1": 0.0}) == 1.0
    assert paired_t_test({"q1": 1.0, "q2": 1.0}, {"q3": 0.0, "q4": 0.0}) == 1.0


def test_t_test_constant_nonzero_difference_is_significant():
    # zero variance of the differences but a non-zero mean: t = inf, p = 0
    a = _scores([1.0, 2.0, 3.0, 4.0])
    b = _scores([0.0, 1.0, 2.0, 3.0])
    assert paired_t_test(a, b) == 0.0


def test_non_finite_scores_are_rejected_naming_the_query():
    with pytest.raises(ValueError, match="'q1'"):
        paired_t_test({"q0": 0.1, "q1": float("nan")}, {"q0": 0.2, "q1": 0.3})
    with pytest.raises(ValueError, match="'q0'"):
        paired_randomization_test({"q0": 0.1, "q1": 0.2}, {"q0": float("inf"), "q1": 0.3})


# --- paired randomisation test -------------------------------------------------------------------------------

def test_randomization_exact_four_queries_by_hand():
    # Differences (1, 2, 3, -1): observed sum 5. A sign assignment's sum is 7 - 2F, with 7 = sum of |d| and
    # F the sum of the |d| whose sign is against that of all-|d|. |sum| >= 5 <=> F <= 1 or F >= 6:
    # F <= 1 for the subsets {}, {1}, {1'} (3 of them), F >= 6 for their 3 complements: 6 of 16, p = 0.375.
    assert paired_randomization_test(*_against_zero([1.0, 2.0, 3.0, -1.0])) == 0.375


def test_randomization_ties_survive_float_rounding():
    # The same differences scaled by 1/10, from float scores: (0.1, 0.2, 0.3, -0.1) only approximately.
    # On paper p = 0.375 as above; a strict >= on the float sums counts only 2 of the 16 (p = 0.125).
    a = _scores([0.7, 0.9, 0.6, 0.1])
    b = _scores([0.6, 0.7, 0.3, 0.2])
    assert paired_randomization_test(a, b) == 0.375


def test_randomization_exact_five_queries_by_hand():
    # Differences (3, 1, 1, 1, 1), all positive: only all-plus and all-minus reach |sum| = 7, so p = 2/32.
    # This is the smallest p an exact test on 5 queries can give.
    assert paired_randomization_test(*_against_zero([3.0, 1.0, 1.0, 1.0, 1.0])) == 2 / 32
    # Differences (2, -1, 1, 1, 1): sum 4 = 6 - 2F, |sum| >= 4 <=> F <= 1 or F >= 5.
    # F <= 1: {}, and each of the four 1s alone: 5 subsets; F >= 5: their complements, 5 more. p = 10/32.
    assert paired_randomization_test(*_against_zero([2.0, -1.0, 1.0, 1.0, 1.0])) == 10 / 32


def test_randomization_identical_or_too_few_queries_give_one():
    a = _scores([0.1, 0.5, 0.9, 0.3, 0.0])
    assert paired_randomization_test(a, dict(a)) == 1.0
    assert paired_randomization_test({"q1": 1.0}, {"q1": 0.0}) == 1.0
    assert paired_randomization_test({"q1": 1.0, "q2": 1.0}, {"q3": 0.0, "q4": 0.0}) == 1.0
    assert paired_randomization_test(dict(a), dict(a), max_exact_queries=0) == 1.0  # Monte Carlo path too


def test_randomization_noise_with_mean_zero_gives_one():
    # Differences +0.1 -0.1 +0.1 -0.1: observed mean 0, every assignment's |mean| >= 0.
    a = _scores([0.5, 0.4, 0.6, 0.5])
    b = _scores([0.4, 0.5, 0.5, 0.6])
    assert paired_randomization_test(a, b) == 1.0


def test_randomization_clearly_better_system_reaches_the_monte_carlo_floor():
    # 50 queries, every difference positive: no random assignment but all-plus/all-minus (chance 2^-49 per
    # draw) reaches the observed sum, so 0 hits and p = (0 + 1) / (samples + 1).
    rng = random.Random(0)
    base = [rng.uniform(0.2, 0.6) for _ in range(50)]
    better = [b + 0.2 + rng.uniform(-0.05, 0.05) for b in base]
    assert paired_randomization_test(_scores(better), _scores(base)) == 1 / 10001
    assert paired_randomization_test(_scores(base), _scores(better), samples=999) == 1 / 1000


def test_randomization_noise_is_not_significant_and_agrees_with_t_test():
    # 300 queries, b = a + zero-mean noise. For n this large the sign-flip distribution of the mean is close
    # to the t distribution, so both p-values should be close (and far above 0.05).
    rng = random.Random(0)
    a = [rng.random() for _ in range(300)]
    b = [x + rng.gauss(0.0, 0.2) for x in a]
    p_random = paired_randomization_test(_scores(a), _scores(b))
    p_t = paired_t_test(_scores(a), _scores(b))
    assert p_t > 0.3
    # Monte Carlo standard error at p ~ 0.6 with 10000 draws: sqrt(0.6 * 0.4 / 10000) ~ 0.005
    assert p_random == pytest.approx(p_t, abs=0.02)


def test_randomization_monte_carlo_agrees_with_exact_at_twelve_queries():
    differences = [0.3, 0.1, 0.2, -0.1, 0.4, 0.05, -0.2, 0.15, 0.1, -0.05, 0.25, 0.0]
    # Reference: count the 4096 sign assignments in plain Python.
    observed = abs(sum(differences))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=12)
               if abs(sum(s * d for s, d in zip(signs, differences))) >= observed - 1e-9)
    exact = hits / 4096
    a, b = _against_zero(differences)
    assert paired_randomization_test(a, b) == exact  # n = 12 <= 16: enumerated
    samples = 20000
    monte_carlo = paired_randomization_test(a, b, samples=samples, max_exact_queries=0, seed=3)
    assert monte_carlo != exact  # the Monte Carlo path really ran
    standard_error = math.sqrt(exact * (1 - exact) / samples)
    assert abs(monte_carlo - exact) <= 4 * standard_error


def test_randomization_is_seeded_and_pairs_by_query_id():
    rng = random.Random(1)
    a = _scores([rng.random() for _ in range(40)])
    b = _scores([rng.random() for _ in range(40)])
    p = paired_randomization_test(a, b, seed=7)
    shuffled = list(b.items())
    rng.shuffle(shuffled)
    assert paired_randomization_test(a, dict(shuffled), seed=7) == p
    assert paired_randomization_test(b, a, seed=7) == p  # two-sided: flipping every sign changes nothing


def test_randomization_rejects_bad_sample_counts():
    for samples in (0, -5, 2.5):
        with pytest.raises(ValueError, match="samples"):
            paired_randomization_test({"q": 1.0}, {"q": 0.0}, samples=samples)


# --- Holm-Bonferroni ---------------------------------------------------------------------------------------

def test_holm_by_hand():
    # m = 4, sorted: a 0.01, c 0.03, b 0.04, d 0.5; times 4, 3, 2, 1: 0.04, 0.09, 0.08, 0.5;
    # made monotone (running maximum): 0.04, 0.09, 0.09, 0.5.
    adjusted = holm_adjust({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.5}, rel=1e-12)
    assert list(adjusted) == ["a", "b", "c", "d"]  # keys kept, in their given order


def test_holm_caps_at_one_and_keeps_tuple_keys():
    # sorted 0.6, 0.7: 2 * 0.6 = 1.2 -> 1; 1 * 0.7 = 0.7, raised to the running maximum 1.
    assert holm_adjust({("x", "m"): 0.6, ("y", "m"): 0.7}) == {("x", "m"): 1.0, ("y", "m"): 1.0}
    # a single test is left as it is; no tests, nothing to adjust
    assert holm_adjust({"only": 0.03}) == {"only": 0.03}
    assert holm_adjust({}) == {}


def test_holm_ties():
    # three equal p = 0.01: 3 * 0.01, then max(0.03, 2 * 0.01), then max(0.03, 0.01): all 0.03.
    assert holm_adjust({"a": 0.01, "b": 0.01, "c": 0.01}) == pytest.approx({"a": 0.03, "b": 0.03, "c": 0.03})


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, "0.1", None])
def test_holm_rejects_values_that_are_not_p_values(bad):
    with pytest.raises(ValueError, match="'broken'"):
        holm_adjust({"fine": 0.2, "broken": bad})


# --- percentile bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_two_queries_by_hand():
    # Differences (1, 3): a resample of 2 is {1,1}, {1,3} or {3,1}, {3,3}, so its mean is 1, 2 or 3 with
    # probability 1/4, 1/2, 1/4 (CDF 0.25, 0.75, 1).
    # 90%: quantiles 0.05 -> 1 and 0.95 -> 3. 40%: quantiles 0.3 and 0.7 both fall on 2.
    # With 10000 draws the empirical CDF is within ~0.005 (one standard error) of these, far from the
    # quantile levels, so the interval is the exact one.
    a, b = _against_zero([1.0, 3.0])
    assert bootstrap_ci(a, b, level=0.9) == pytest.approx((1.0, 3.0), abs=1e-12)
    assert bootstrap_ci(a, b, level=0.4) == pytest.approx((2.0, 2.0), abs=1e-12)


def test_bootstrap_three_queries_by_hand():
    # Differences (-1, 0, 4). A resample has i copies of -1, j of 0, k of 4 (i + j + k = 3) with probability
    # 3!/(i! j! k!) / 27; its sum is 4k - i:
    #   sum  -3  -2  -1   0   2   3   4   7   8  12
    #   /27   1   3   3   1   3   6   3   3   3   1     cumulative: 1 4 7 8 11 17 20 23 26 27
    # 80%: quantile 0.1 (2.7/27) -> sum -2, quantile 0.9 (24.3/27) -> sum 8: means (-2/3, 8/3).
    # 95%: quantile 0.025 (0.675/27) -> sum -3, quantile 0.975 (26.3/27) -> sum 12: means (-1, 4).
    # The nearest CDF step is >= 0.012 (>= 6 Monte Carlo standard errors) from every quantile level.
    a, b = _against_zero([-1.0, 0.0, 4.0])
    assert bootstrap_ci(a, b, level=0.8) == pytest.approx((-2 / 3, 8 / 3), abs=1e-12)
    assert bootstrap_ci(a, b, level=0.95) == pytest.approx((-1.0, 4.0), abs=1e-12)
    assert bootstrap_ci(a, b, level=0.8, seed=1) == pytest.approx((-2 / 3, 8 / 3), abs=1e-12)


def test_bootstrap_identical_differences_give_a_point():
    a = _scores([0.75, 0.5, 1.0])
    b = _scores([0.5, 0.25, 0.75])  # every difference 0.25
    assert bootstrap_ci(a, b) == (0.25, 0.25)
    assert bootstrap_ci(a, dict(a)) == (0.0, 0.0)
    assert bootstrap_ci({"q1": 0.9, "x": 0.0}, {"q1": 0.4}) == (0.5, 0.5)  # one common query


def test_bootstrap_is_seeded_and_brackets_a_clear_gain():
    rng = random.Random(0)
    base = [rng.uniform(0.2, 0.6) for _ in range(50)]
    better = [b + 0.2 + rng.uniform(-0.05, 0.05) for b in base]
    low, high = bootstrap_ci(_scores(better), _scores(base))
    # every difference lies in [0.15, 0.25], so must every resampled mean
    assert 0.15 <= low < high <= 0.25
    assert bootstrap_ci(_scores(better), _scores(base)) == (low, high)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci({"q": 1.0, "r": 0.0}, {"q": 0.0, "r": 0.0}, level=95)
    with pytest.raises(ValueError, match="samples"):
        bootstrap_ci({"q": 1.0, "r": 0.0}, {"q": 0.0, "r": 0.0}, samples=0)
    with pytest.raises(ValueError, match="no query"):
        bootstrap_ci({"q1": 1.0}, {"q2": 0.0})
