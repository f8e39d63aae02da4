"""A run before it runs: its spec, and what the spec resolves to (label, folder, settings, identity).

Light on purpose (no torch, no Avalanche): `run` plans every run of a sweep, and refuses the
stale ones, from the cached catalogue (harness.catalog) before anything heavy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import identity, results
from harness.params import resolve_params


@dataclass(frozen=True)
class RunSpec:
    method: str
    protocol: str
    seed: int
    out: str
    device: str = "cpu"
    overrides: tuple[tuple[str | None, str, str], ...] = ()
    epochs: int | None = None
    max_train_per_class: int | None = None
    data_root: str | None = None
    download: bool = False
    force: bool = False
    restart: bool = False  # ignore an existing checkpoint and start the run over
    quiet: bool = False
    plugins: tuple[str, ...] = ()
    threads: int | None = None  # CPU threads; None: follow the idle cores (harness.threads)
    loggers: tuple[str, ...] = ()  # --logger: tensorboard, wandb, csv (harness.loggers); results do not depend on them
    fail_fast: bool = False  # a run that raises stops the sweep (else it is recorded and the others go on)


@dataclass(frozen=True)
class Plan:
    """What a spec resolves to before anything runs: its row, folder, settings and identity."""

    label: str
    protocol_dir: str
    hp: dict  # every resolved setting
    changed: dict  # the settings changed from their defaults (they name the row)
    params: dict  # the resolved settings that affect results (the identity's)
    protocol_spec: dict
    code: dict  # harness.identity.code_fingerprint
    path: Path
    defaults: dict  # each setting's declared default


def plan_run(spec: RunSpec, catalog=None) -> Plan:
    """The run's label, folder, settings and identity, without running anything: from the
    registries, or from a harness.catalog.Catalog (no import of the method's module)."""
    if catalog is None:
        from harness.registry import METHODS, PROTOCOLS

        cls, protocol = METHODS.get(spec.method), PROTOCOLS.get(spec.protocol)
        files = identity.method_files(cls, METHODS.path(spec.method))
    else:
        cls, protocol = catalog.methods.get(spec.method), catalog.protocols.get(spec.protocol)
        files = catalog.method_files[spec.method]
    # --epochs means every task, the first one included (methods such as iCaRL declare init_epochs)
    hp, changed = resolve_params(cls, protocol.family, spec.overrides, {"epochs": spec.epochs, "init_epochs": spec.epochs})
    changed = {k: v for k, v in changed.items() if cls.params[k].affects_results}  # names the row
    if "init_epochs" in changed and changed.get("epochs") == changed["init_epochs"]:
        del changed["init_epochs"]  # implied by epochs: keep labels short
    label = results.run_label(spec.method, changed)
    protocol_dir = results.protocol_dirname(spec.protocol, spec.max_train_per_class)
    return Plan(label, protocol_dir, hp, changed,
                params={k: v for k, v in hp.items() if cls.params[k].affects_results},
                protocol_spec=protocol.to_dict(),
                code=identity.code_fingerprint(files),
                path=results.run_dir(Path(spec.out), protocol_dir, label, spec.seed),
                defaults={k: p.default for k, p in cls.params.items()})


def plan_label(spec: RunSpec) -> tuple[str, str, dict, dict]:
    """(label, protocol dir, resolved params, changed params) without running anything."""
    plan = plan_run(spec)
    return plan.label, plan.protocol_dir, plan.hp, plan.changed


def stale(plan: Plan) -> list[str]:
    """What changed since the run in plan.path was made (empty: nothing, or no run there yet)."""
    recorded = identity.read_config(plan.path)
    if recorded is None:
        return []
    return identity.changes(recorded, plan.params, plan.protocol_spec, plan.code, plan.defaults)


def refusal(spec: RunSpec, plan: Plan) -> str | None:
    """Why the run in plan.path may not be reused or resumed (one line), or None. --force, and
    --restart for an unfinished run, start it over, so nothing is refused."""
    finished = results.is_finished(plan.path)
    if spec.force or (spec.restart and not finished):
        return None
    changed = stale(plan)
    if not changed:
        return None
    act = "--force reruns it in its folder (its results are replaced)" if finished else "--restart starts it over"
    return (f"{plan.label} seed {spec.seed} in {plan.path} was made with other settings or code "
            f"({'; '.join(changed)}): {act}, or --out DIR runs it elsewhere")
