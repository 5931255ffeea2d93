"""The shipped corpus splits: disjoint by document, as the manifest says."""
import json


from premoe import testbed
from premoe.testbed.corpus import DOMAINS, Caps, Domain, read_jsonl_gz, split_documents


def test_shipped_splits_are_disjoint_and_match_manifest():
    manifest = json.loads((testbed.corpus_path() / "manifest.json").read_text())
    assert set(manifest["domains"]) == set(DOMAINS)
    assert sum(info["trained"] for info in manifest["domains"].values()) >= 6
    assert sum(not info["trained"] for info in manifest["domains"].values()) >= 2
    for domain, info in manifest["domains"].items():
        seen: dict[str, str] = {}
        for split in ("calib", "val", "test"):
            records = read_jsonl_gz(testbed.corpus_path() / domain / f"{split}.jsonl.gz")
            assert len(records) == info["splits"][split]["documents"]
            assert sum(len(r["text"].encode()) for r in records) == info["splits"][split]["bytes"]
            for r in records:
                assert r["id"] not in seen, f"{domain}: {r['id']} in {seen.get(r['id'])} and {split}"
                seen[r["id"]] = split


def test_split_assignment_is_deterministic_and_capped():
    docs = [(f"doc{i}", "x" * 100) for i in range(200)]
    domain = Domain("toy", "toy", (), "none", lambda: iter(docs))
    caps = Caps(train=5000, calib=1000, val=500, test=500)
    first, second = split_documents(domain, caps), split_documents(domain, caps)
    assert first == second
    ids = [r["id"] for split in first.values() for r in split]
    assert len(ids) == len(set(ids))
    assert sum(len(r["text"]) for r in first["test"]) <= 500 + 100


def test_unseen_domains_have_no_train_split():
    domain = Domain("toy", "toy", (), "none", lambda: iter([(f"d{i}", "y" * 10) for i in range(50)]), trained=False)
    assert "train" not in split_documents(domain, Caps(calib=100, val=100, test=100))
