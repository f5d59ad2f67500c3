"""Write tests/data/axolotl_schema_keys.txt: every config key of Axolotl's schema, read from its source.

    python tests/extract_axolotl_schema_keys.py [GIT_DIR] [COMMIT]

GIT_DIR is a (bare) clone of axolotl-ai-cloud/axolotl (default: the mirror under /work/.mirror), COMMIT
the revision read (default HEAD). Run once per Axolotl update; the test that reads the file
(tests/test_config_axolotl_keys.py) needs neither the clone nor Axolotl.

The source is parsed, never imported (Axolotl is not a dependency). Keys, one per line:
  * `key`: a field (or alias) of AxolotlInputConfig / AxolotlConfigWCapabilities and the classes they
    derive from, or of a plugin's input-args class (each integration's `get_input_args`): Axolotl
    merges those into the config when the plugin is listed, so users write them at the top level;
  * `datasets[].key`: a field of a `datasets:` / `test_datasets:` / `pretraining_dataset:` entry;
  * `datasets[].type.key`: a field of a user-defined prompt format (a dict given as `type:`).
Nested models (fsdp_config, trl, vllm, peft, ...) are one key each: their insides are their own.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

MIRROR = "/work/.mirror/axolotl-ai-cloud+axolotl/repo"
OUT = Path(__file__).parent / "data" / "axolotl_schema_keys.txt"
TOP = ("AxolotlInputConfig", "AxolotlConfigWCapabilities")
ENTRIES = ("SFTDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset", "SyntheticDataset", "PretrainingDataset")
USER_TYPES = ("UserDefinedPrompterType", "UserDefinedDPOType", "UserDefinedKTOType")


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout


def classes(source: str) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def field_names(cls: ast.ClassDef) -> list[str]:
    """The class-level annotated names, plus the `alias=` / `validation_alias=` spellings of each."""
    names = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name.startswith("_") or name == "model_config":
            continue
        names.append(name)
        if isinstance(node.value, ast.Call):
            for kw in node.value.keywords:
                if kw.arg in ("alias", "validation_alias") and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    names.append(kw.value.value)
    return names


def base_names(cls: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else b.attr for b in cls.bases if isinstance(b, (ast.Name, ast.Attribute))]


def main(git_dir: str = MIRROR, commit: str = "HEAD") -> None:
    commit = git(git_dir, "rev-parse", commit).strip()
    files = git(git_dir, "ls-tree", "-r", "--name-only", commit, "src/axolotl/utils/schemas", "src/axolotl/integrations").split()
    defined: dict[str, ast.ClassDef] = {}
    plugin_args: list[str] = []
    for path in files:
        if not path.endswith(".py"):
            continue
        source = git(git_dir, "show", f"{commit}:{path}")
        if path.startswith("src/axolotl/utils/schemas/") or path.endswith("/args.py"):
            defined.update(classes(source))
        plugin_args += re.findall(r"def get_input_args\(self\)[^:]*:(?:\s*\"\"\"(?:.|\n)*?\"\"\")?\s*return \"[\w.]+\.(\w+)\"", source)
    missing = [name for name in (*TOP, *ENTRIES, *USER_TYPES, *plugin_args) if name not in defined]
    if missing:
        raise SystemExit(f"classes not found in {commit}: {', '.join(missing)} (has the schema moved?)")

    def fields(name: str, seen: set[str]) -> list[str]:
        if name in seen or name not in defined:  # BaseModel, the validation mixins' own bases
            return []
        seen.add(name)
        own = field_names(defined[name])
        return own + [f for base in base_names(defined[name]) for f in fields(base, seen)]

    top = {f for name in (*TOP, *plugin_args) for f in fields(name, set())}
    entry = {f for name in ENTRIES for f in fields(name, set())}
    user_type = {f for name in USER_TYPES for f in fields(name, set())}
    lines = [f"# Axolotl's config keys, from axolotl-ai-cloud/axolotl {commit} (src/axolotl/utils/schemas/, the plugins' args)",
             f"# written by tests/extract_axolotl_schema_keys.py; plugins: {', '.join(sorted(set(plugin_args)))}",
             *sorted(top), *sorted(f"datasets[].{k}" for k in entry), *sorted(f"datasets[].type.{k}" for k in user_type)]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{OUT}: {len(top)} top-level keys, {len(entry)} dataset-entry keys, {len(user_type)} prompt-format keys ({commit[:12]})")


if __name__ == "__main__":
    main(*sys.argv[1:])
