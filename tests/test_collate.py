from trainer.collate import collate, tokenize_completions
from trainer.logps import IGNORE_INDEX


def test_collate_pads_right_and_masks_prompt():
    b = collate([[1, 5], [1]], [[7, 2], [8, 9, 2]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 7, 2], [1, 8, 9, 2]]
    b = collate([[1, 5, 6], [1]], [[7, 2], [8, 2]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    i = IGNORE_INDEX
    assert b["labels"].tolist() == [[i, i, i, 7, 2], [i, 8, 2, i, i]]
    assert b["completion_lengths"].tolist() == [2, 2]


def test_tokenize_completions_bos_and_eos(toy_tokenizer):
    p, c = tokenize_completions(toy_tokenizer, ["1+2="], ["3"])
    assert p[0][0] == toy_tokenizer.bos_token_id and len(p[0]) == 5
    assert c[0] == [toy_tokenizer.convert_tokens_to_ids("3"), toy_tokenizer.eos_token_id]
