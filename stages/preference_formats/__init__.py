"""Preference and reward dataset types (`rl:`, `reward_model:`, `process_reward_model:`), one
module per Axolotl type prefix: `chatml.intel` is the `intel` loader of chatml.py.

What a module gives the format_preference stage:

    build(loader: str, spec, method: str) -> Formatter

`loader` is the part after the dot (`intel`; "default" when the type names no loader, and a
mapping type is user_defined.default), `spec` the dataset entry's slice (format_preference.Spec),
`method` what the rows train: "paired" (DPO, IPO, SimPO, ORPO, reward models), "unpaired" (KTO)
or "steps" (process reward models). An unknown loader, or one the method cannot use, raises
rows.UnknownKind naming the known ones. Formatter.row(row, tokenizer) returns, as strings
rendered with the chat template:
    paired    {"prompt", "chosen", "rejected"}
    unpaired  {"prompt", "completion", "label": bool}
    steps     {"prompt", "completions": [str], "labels": [bool]}
A row that cannot be used raises rows.RowError naming its field; the stage adds file and row.
"""
