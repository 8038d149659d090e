from pipeline.tasks import addition


def test_reproducible_and_seeded():
    assert addition.prompts(50, seed=1) == addition.prompts(50, seed=1)
    assert addition.prompts(50, seed=1) != addition.prompts(50, seed=2)
    assert addition.sft_data(20, seed=3) == addition.sft_data(20, seed=3)


def test_answers_are_sums():
    for row in addition.sft_data(200, seed=0) + addition.heldout(50):
        a, b = row["prompt"].removesuffix("=").split("+")
        assert int(row.get("response", row["answer"])) == int(a) + int(b)


def test_heldout_never_overlaps_training():
    heldout = {r["prompt"] for r in addition.heldout(400, seed=0)}
    train = {r["prompt"] for r in addition.prompts(5000, seed=0)}
    sft = {r["prompt"] for r in addition.sft_data(20000, seed=5)}
    assert len(heldout) == 400
    assert not heldout & train and not heldout & sft
    # The split is a property of the prompt, not of the seed.
    assert all(addition.is_heldout(p) for p in heldout)
    assert not any(addition.is_heldout(p) for p in train | sft)


def test_verifier_exact_answer():
    rows = [{"answer": "579"}] * 4
    got = addition.verify(["123+456="] * 4, ["579", " 579 ", "578", "5790"], rows)
    assert got == [1.0, 1.0, 0.0, 0.0]
