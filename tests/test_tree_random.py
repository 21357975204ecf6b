import torch

from sd_func import random, tree


def test_flatten_roundtrip_and_state_dict():
    t = {"a": {"b": torch.ones(2), "c": {"0": torch.zeros(1)}}, "d": torch.ones(3)}
    flat = tree.flatten(t)
    assert list(flat) == ["a/b", "a/c/0", "d"]
    assert tree.flatten(tree.unflatten(flat)).keys() == flat.keys()
    sd = tree.to_state_dict(t)
    assert set(sd) == {"a.b", "a.c.0", "d"}
    assert tree.flatten(tree.from_state_dict(sd)).keys() == flat.keys()


def test_rules_and_norm():
    t = {"vae": {"w": torch.ones(2)}, "unet": {"w": torch.ones(2) * 2}}
    m = tree.map_with_rules(lambda x, r: x * 0 if r == "freeze" else x, t, [("vae/.*", "freeze")])
    assert m["vae"]["w"].sum() == 0 and m["unet"]["w"].sum() == 4
    assert torch.isclose(tree.global_norm(t), torch.tensor(10.0).sqrt())
    missing, unexpected, wrong = tree.diff({"a": torch.ones(2), "b": torch.ones(1)},
                                           {"a": torch.ones(3), "c": torch.ones(1)})
    assert missing == ["b"] and unexpected == ["c"] and wrong[0].startswith("a:")


def test_keys_are_deterministic_and_independent():
    k = random.key(0)
    assert k == random.key(0) and k != random.key(1)
    a, b = random.split(k)
    assert a != b and random.fold_in(k, 3) == random.fold_in(k, 3) != random.fold_in(k, 4)
    x = random.normal(a, (4,))
    assert torch.equal(x, random.normal(a, (4,)))
    batch = random.normal_per_key([a, b], (3,))
    assert torch.equal(batch[1], random.normal(b, (3,)))
