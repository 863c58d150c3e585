"""The demo expert pack: a tiny MoE base, LoRA skill adapters and their checkable tasks.

    build.build_pack(out_dir, *, seed=0, quick=False, progress=None) -> Path
    manifest.expert_specs(pack_dir, *, defaults_only=False)   spec dicts ready for parse_spec
    manifest.load_manifest(pack_dir) / manifest.load_heldout(pack_dir)
    evaluate.generate(model, queries, max_new_tokens, *, adapter_names=None) -> answers
    tasks.SKILLS, tasks.skill_by_name(name).solve(payload)

Prompt format: ``<s>{user message}<ans>``; the answer ends with ``</s>``. Nothing heavy is imported
here (torch / transformers load inside the functions that need them).
"""
