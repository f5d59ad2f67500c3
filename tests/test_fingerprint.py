"""Code fingerprints at definition level (stages/fingerprint.py), on throwaway modules."""

from __future__ import annotations

import json
import textwrap

import pytest

from stages import dag
from stages import fingerprint as fp


@pytest.fixture
def package(tmp_path, monkeypatch):
    """`write(name, source)` puts module `stages.<name>` in a throwaway package dir that the
    fingerprint code reads instead of the real one."""
    root = tmp_path / "stages"
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.setattr(fp, "PACKAGE_DIR", root)
    monkeypatch.setattr(fp, "REPO_DIR", tmp_path)
    fp.clear_caches()

    def write(name: str, source: str) -> None:
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        fp.clear_caches()

    yield write
    fp.clear_caches()


def prints(module: str = "stages.mod", name: str = "run") -> dict[str, str]:
    return fp.fingerprint([(module, name)])


HELPER = textwrap.dedent('''
    """Helpers."""
    LIMIT = 3


    def used(x):
        return min(x, LIMIT)


    def unused(x):
        return x * 2


    class Box:
        size: int = 1

        def grow(self):
            return self.size + LIMIT
''')

MOD = textwrap.dedent('''
    """A stage."""
    from stages.helper import used
    from stages import helper


    def run(x):
        """Doc."""
        return used(x) + helper.Box().grow()  # a comment


    def display(x):
        return helper.unused(x)
''')


def test_comments_docstrings_and_formatting_do_not_count(package):
    package("helper", HELPER)
    package("mod", MOD)
    before = prints()
    assert set(before) == {"stages/mod.py:run", "stages/helper.py:used", "stages/helper.py:LIMIT", "stages/helper.py:Box"}
    package("mod", MOD.replace('"""Doc."""', "# only a comment").replace("# a comment", "") + "\n# trailing\n")
    package("helper", HELPER.replace('"""Helpers."""', '"""Reworded."""').replace("return min(x, LIMIT)", "return min(\n            x, LIMIT)"))
    assert prints() == before


@pytest.mark.parametrize("edit, changed", [
    (lambda s: s.replace("min(x, LIMIT)", "max(x, LIMIT)"), {"stages/helper.py:used"}),
    (lambda s: s.replace("LIMIT = 3", "LIMIT = 4"), {"stages/helper.py:LIMIT"}),
    (lambda s: s.replace("size: int = 1", "size: int = 2"), {"stages/helper.py:Box"}),
    (lambda s: s.replace("x * 2", "x * 3"), set()),  # only display() calls it
    (lambda s: s + "\nUNUSED = 1\n", set()),
])
def test_only_what_run_reaches_counts(package, edit, changed):
    package("helper", HELPER)
    package("mod", MOD)
    before = prints()
    package("helper", edit(HELPER))
    after = prints()
    assert {k for k in before | after if before.get(k) != after.get(k)} == changed


def test_a_module_used_as_a_value_is_taken_whole(package):
    package("deep", "W = 1\n")
    package("helper", HELPER + "\nfrom stages import deep\n")
    package("mod", "from stages import helper\n\ndef run(name):\n    return getattr(helper, name)(1)\n")
    before = prints()
    assert {"stages/helper.py", "stages/deep.py"} <= set(before)  # whole, with what it imports
    package("helper", HELPER + "\nfrom stages import deep\n" + "\ndef another():\n    return 0\n")
    assert prints()["stages/helper.py"] != before["stages/helper.py"]


def test_globals_and_star_imports_fall_back_to_whole_modules(package):
    package("helper", HELPER)
    package("mod", "from stages.helper import *\n\ndef run(x):\n    return used(x)\n")
    assert "stages/helper.py" in prints()
    package("mod", "from stages.helper import used\n\ndef run(x):\n    return globals()['used'](x)\n")
    assert "stages/mod.py" in prints()


def test_annotations_are_not_followed_but_defaults_are(package):
    package("helper", HELPER)
    package("mod", "from stages.helper import Box, LIMIT\n\ndef run(x: Box, y=LIMIT) -> Box:\n    return x\n")
    assert set(prints()) == {"stages/mod.py:run", "stages/helper.py:LIMIT"}


def test_module_level_code_and_registries_count(package):
    package("mod", '''
        RULES = []
        TABLE = {}


        def rule(f):
            RULES.append(f)
            return f


        @rule
        def positive(x):
            assert x > 0


        TABLE["a"] = 1
        TABLE.update(b=2)
        if True:
            FLAG = 1


        def run(x):
            return [r(x) for r in RULES], TABLE, FLAG
    ''')
    before = prints()
    assert {"stages/mod.py:RULES", "stages/mod.py:TABLE", "stages/mod.py:<module>"} <= set(before)
    for old, new in (("x > 0", "x >= 0"), ("update(b=2)", "update(b=3)"), ("FLAG = 1", "FLAG = 2"), ('TABLE["a"] = 1', 'TABLE["a"] = 5')):
        source = textwrap.dedent(open(fp.PACKAGE_DIR / "mod.py").read())
        package("mod", source.replace(old, new))
        assert prints() != before, old
        before = prints()


def test_imports_inside_functions_are_followed(package):
    package("helper", HELPER)
    package("mod", "def run(x):\n    from stages.helper import used\n    return used(x)\n")
    assert "stages/helper.py:used" in prints()
    package("mod", "def run(x):\n    import stages.helper\n    return stages.helper.used(x)\n")
    assert "stages/helper.py" in prints()


def test_real_stages_leave_display_and_bookkeeping_out():
    fp.clear_caches()
    for stage in ("fetch_model", "tokenizer", "fetch_data", "format", "tokenize", "mix", "pack", "merge"):
        files = fp.modules_of(prints(f"stages.{stage}"))
        assert "stages/ui.py" not in files and "stages/cli.py" not in files and "stages/dag.py" not in files, stage
        entries = prints(f"stages.{stage}")
        assert not any(k.startswith("stages/store.py:Store") or k.startswith("stages/store.py:StatIndex") for k in entries), stage
    tokenize = prints("stages.tokenize")
    assert "stages/store.py:write_table" in tokenize and "stages/tokenize.py:labels_for" in tokenize
    # format takes its prompt strategy whole (loaded by name), and only that one
    from stages import dag

    format_node = [n for n in dag.plan({"base_model": "x", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "sequence_len": 64}, "format[0]") if n.stage == "format"][0]
    files = format_node.code()["files"]
    assert "stages/formats/alpaca.py" in files and "stages/formats/chat_template.py" not in files


def test_remembered_values_last_until_a_file_of_the_package_changes(package, tmp_path):
    package("mod", "def run():\n    return 1\n")
    memo = tmp_path / "index" / "code.json"
    calls = []

    def compute():
        calls.append(1)
        return fp.fingerprint([("stages.mod", "run")])

    first = fp.remembered(memo, "k", compute)
    fp.clear_caches()  # as a new process: only the file is left
    assert fp.remembered(memo, "k", compute) == first and len(calls) == 1
    package("other", "X = 1\n")  # any file of the package, even one the value does not reach
    assert fp.remembered(memo, "k", compute) == first and len(calls) == 2
    package("mod", "def run():\n    return 2\n")
    assert fp.remembered(memo, "k", compute) != first and len(calls) == 3
    memo.write_text("{not json")
    fp.clear_caches()
    fp.remembered(memo, "k", compute)
    assert len(calls) == 4 and json.loads(memo.read_text())["package"] == fp.package_digest()


def test_a_remembered_process_imports_no_stage_module_for_code_or_keys(tmp_path):
    """What the memo is for: a warm process neither parses the stages' code nor imports every
    stage module to learn which keys they read, and gets the same answers."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from stages import dag
        memo = Path({str(tmp_path / "code.json")!r})
        node = dag.Node("pack", dag.stage_module("pack").Params.model_construct())
        keys = dag.keys_read(memo)
        print(json.dumps({{"code": node.code(memo), "keys": [sorted(k) for k in keys],
                          "train_imported": "stages.train" in sys.modules,
                          "parsed": dag.fingerprint.analyse.cache_info().currsize}}))
    """)
    import subprocess
    import sys
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      check=True, cwd=fp.REPO_DIR).stdout) for _ in range(2)]
    cold, warm = runs
    assert cold["code"] == warm["code"] and cold["keys"] == warm["keys"]
    assert cold["train_imported"] and cold["parsed"] > 0
    assert not warm["train_imported"] and warm["parsed"] == 0
    fresh = dag.Node("pack", dag.stage_module("pack").Params.model_construct())
    assert warm["code"]["files"] == fresh.code()["files"]
    assert warm["keys"] == [sorted(k) for k in dag.keys_read()]
