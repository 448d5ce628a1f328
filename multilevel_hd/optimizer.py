"""The optimizer classes: options, state, the state dict, rates(); `step()` hands each
param group to a backend (`multilevel_hd.backends`) as a `GroupJob`.

torch.compile: a step is split into host-side preparation, `_init_group` (validation,
options, plan, state creation, the backend), and the part that `torch.compile` traces
(`_job` and the backend's step). Dynamo runs a torch.optim optimizer's `_init_group`
eagerly when it traces `step()` instead of tracing it, as it does for torch.optim's own
optimizers, so state tensors are real tensors (graph inputs) rather than tensors created
inside the graph, and a step traced this way needs no recompilation at the second call.
"""
from __future__ import annotations

import dataclasses

import torch

from . import backends, fsdp
from .hierarchy import GroupLayout, StepPlan
from .options import DEFAULT_LEVELS, DEFAULT_RULE, check_nonnegative, check_twin_options, lr_scale, resolve
from .reference import applied_rate, rate_view
from .state import (
    GroupJob,
    compute_dtype,
    expected_param_keys,
    group_dtype,
    group_state_shapes,
    new_group_state,
    new_param_state,
    sign_tensor,
)

_HD_DEFAULTS = dict(
    levels=DEFAULT_LEVELS, init_weights=None, hypergrad_lr=None, hypergrad_rule=DEFAULT_RULE,
    hypergrad_scaling="size", combination_lr=None, shrinkage=None, rate_bounds=(0.0, None),
    hd_decay=0.0, final_lr=None, skip_nonfinite=True, backend="auto",
)


class _MultiLevelOptimizer(torch.optim.Optimizer):
    """Shared driver of MultiLevelSGD and MultiLevelAdam; `_kind` names the base optimizer."""

    _kind: str
    # What torch.amp.GradScaler and Lightning read: True makes GradScaler.step() hand step()
    # its scale and found_inf as the attributes `grad_scale` and `found_inf` (0-d device
    # tensors) instead of unscaling the gradients in a pass of its own (the backends unscale
    # as they read, and found_inf skips the step); set per optimizer by `amp_unscale_in_step`.
    _step_supports_amp_scaling = False

    def __init__(self, params, defaults: dict, sharding_group=None, amp_unscale_in_step=None):
        # Every option is checked before the parameters are looked at: first torch.optim's own
        # checks, so that its error comes first, then the rest of this optimizer's.
        check_twin_options(self._kind, defaults)
        _resolve({**defaults, "initial_lr": _number(defaults["lr"])}, self._kind)
        _check_torch_optim_flags(defaults)
        self._step_supports_amp_scaling = _amp_unscale_in_step(amp_unscale_in_step, defaults["fused"])
        # add_param_group (called by the base __init__) appends to these.
        self.group_states: list = []  # per group: None until its first step, then a dict
        self._layouts: list[GroupLayout] = []
        self._plans: list = []
        self._options: list = []  # per group: (option key, GroupOptions, state keys) of the last step
        self._backends: list = []  # per group: the backend module of the last step
        self._fresh: list = []  # per group: the parameters without state that this step's check found
        self._state_levels: list = []  # per group: the levels its state was made for (None: no state yet)
        self._row_shardings: list = []  # per group: fsdp.RowSharding of DTensor parameters, else None
        # what `_option_key` compares: every option but lr, and the scheduler's base lr. Not
        # torch.optim's implementation flags: no step option depends on them (the backend is
        # resolved afresh at each step), and Dynamo's traced view of the groups sets
        # "capturable" to True, which would make a compiled step re-resolve the options.
        self._option_names = tuple(k for k in defaults if k not in ("lr", *_IMPLEMENTATION_FLAGS)) + ("initial_lr",)
        self.sharding_group = sharding_group
        super().__init__(params, defaults)

    # -- copies (copy.deepcopy, pickle, torch.save) -------------------------------------
    # torch.optim.Optimizer keeps only defaults, state and param_groups; a step also needs the
    # group states (t, rates, weights), the layouts and the option names. What a step rebuilds
    # is left out (plans with their device tables, which hold the original's tensor addresses;
    # resolved options; backend modules), and hooks are dropped, as torch.optim drops them.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(group_states=self.group_states, _state_levels=self._state_levels, _layouts=self._layouts,
                     _option_names=self._option_names, sharding_group=self.sharding_group,
                     _step_supports_amp_scaling=self._step_supports_amp_scaling)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        groups = len(self.param_groups)
        self._plans, self._options, self._backends = [None] * groups, [None] * groups, [None] * groups
        self._fresh = [[] for _ in range(groups)]
        # (process groups are not copied: found again from the parameters)
        self._row_shardings = [fsdp.row_sharding(g["params"], i) for i, g in enumerate(self.param_groups)]

    # -- construction ---------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group["lr"], torch.Tensor) and group["lr"].numel() != 1:
                raise ValueError("Tensor lr must be 1-element")  # torch.optim's message
            # The base of an LR scheduler's factor (schedulers set it the same way), where the
            # rates start: a number, also for a tensor lr (read here once, never in a step).
            group.setdefault("initial_lr", _number(group["lr"]))
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("multilevel_hd does not support complex parameters")
                if not p.is_floating_point():
                    raise ValueError(f"parameters must be floating point, got {p.dtype}")
            resolve(_with_number_lr(group), self._kind)
            _check_torch_optim_flags(group)
            row_sharding = fsdp.row_sharding(group["params"], len(self.param_groups) - 1)
            if row_sharding is not None and self.sharding_group is not None:
                raise ValueError("sharding_group is for whole tensors sharded over ranks (ZeRO); DTensor "
                                 "parameters (FSDP2) are reduced over their own device mesh: leave it None")
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            self.param_groups.pop()
            raise
        self.group_states.append(None)
        self._state_levels.append(None)
        self._row_shardings.append(row_sharding)
        self._layouts.append(fsdp.layout_of(group["params"]))
        self._plans.append(None)
        self._options.append(None)
        self._backends.append(None)
        self._fresh.append([])
        # Resolve (import, load) the backend now, outside any torch.compile'd step: after
        # this, finding it is a dictionary read that Dynamo traces (importlib is not).
        # A backend that cannot run raises at step(), as before.
        if group["params"]:
            try:
                _backend_name(group, group["params"][0].device)
            except RuntimeError:
                pass

    # -- one step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked before any group changes, so that a step that raises leaves
        # everything as it was (a later group's bad option must not find an earlier one stepped).
        checked = [self._init_group(group, index, check_only=True) for index, group in enumerate(self.param_groups)]
        for index, (group, active) in enumerate(zip(self.param_groups, checked)):
            if not active:
                continue
            self._init_group(group, index, checked=active)
            job = self._job(index, group)
            if self._row_shardings[index] is None:
                self._backends[index].step(job)
            else:
                rowless = sorted(set(job.plan.layers) - set(job.plan.active))  # no rows on this rank
                fsdp.step(self._backends[index], job, [self.state[group["params"][j]] for j in rowless])
        return loss

    def _init_group(self, group: dict, index: int, check_only: bool = False, checked: tuple | None = None) -> tuple:
        """Everything host-side of a group's step: checks, options, plan, state, backend.
        Every check comes before anything changes; `check_only` stops there. `checked`: what
        a `check_only` call of this step returned, whose checks need not run again (nor the
        options be resolved again: that call left them in `_options`).

        Returns the indices (in group order) of the parameters that step: those with a
        gradient and at least one element. Under torch.compile Dynamo runs this method
        eagerly (torch.optim's `_init_group` protocol), so nothing here is traced; what it
        decides is guarded through what `_job` reads (the gradients, the cached objects).
        """
        params = group["params"]
        active = checked or tuple(j for j, p in enumerate(params) if p.grad is not None and p.numel() > 0)
        if not active:
            if self.sharding_group is not None:  # the other ranks would wait for its sums forever
                raise RuntimeError(
                    f"param group {index} has no gradient on this rank; with sharding_group every "
                    "rank must hold a parameter with a gradient in every param group"
                )
            return active
        device = params[active[0]].device
        for j in () if checked else active:
            p = params[j]
            if p.grad.is_sparse:
                raise RuntimeError("multilevel_hd does not support sparse gradients")
            if p.device != device:
                raise RuntimeError(
                    f"all parameters of a param group must be on one device (level sums span "
                    f"the group); found {device} and {p.device}"
                )
        # (the check pass of this step resolved them)
        opts = self._options[index][1] if checked else self._group_options(index, group, device)
        backend = _backend_name(group, device)
        state_levels = self._state_levels[index]
        if state_levels is not None and state_levels != opts.levels:
            raise ValueError(
                f"param group {index}'s levels cannot change after its first step: its state is for "
                f"{state_levels}, the group now says {opts.levels}"
            )
        if not checked:  # one look at each state; making the missing ones (below) reads only `fresh`
            keys, fresh = self._options[index][2], []
            for j in active:
                st = self.state.get(params[j])
                if not st:
                    fresh.append(j)
                elif st.keys() != keys:
                    raise ValueError(
                        f"the state of param group {index} does not fit its options: momentum cannot become or "
                        "stop being 0, nor nesterov or amsgrad change, after a parameter's first step"
                    )
            self._fresh[index] = fresh
        if check_only:
            return active
        self._backends[index] = backends.get(backend)
        group_state = self.group_states[index]
        if group_state is None:
            group_state = self.group_states[index] = new_group_state(
                opts, self._layouts[index], device, group_dtype(params)
            )
            self._state_levels[index] = opts.levels
        # the backends walk the tensors with rows on this rank (all of them unless sharded)
        walked = active if self._row_shardings[index] is None else fsdp.with_rows(params, active)
        plan = self._plans[index]
        if plan is None or (plan.active, plan.layers) != (walked, active):
            plan = self._plans[index] = StepPlan(self._layouts[index], walked, active)
            plan.prepare(device, group_state["weights"].dtype)
        fresh, self._fresh[index] = self._fresh[index], []  # (taken: a state is never made twice)
        for j in fresh:
            self.state[params[j]] = new_param_state(params[j], opts)
        if opts.maximize:  # one sign per math dtype, not per tensor
            for dtype in dict.fromkeys(compute_dtype(params[j].dtype) for j in active):
                sign_tensor(plan, -1.0, device, dtype)
        return active

    def _group_options(self, index: int, group: dict, device):
        """The group's resolved options, resolved again only when an option changed (an LR
        scheduler changing only `lr` costs a copy with the new `lr_scale`). Cached beside them,
        made once per resolution: the keys of a parameter's state under them (what a step
        checks the states against)."""
        key = _option_key(group, self._option_names)
        cached = self._options[index]
        if cached is None or cached[0] != key:
            opts = _resolve(group, self._kind)
            cached = self._options[index] = (key, opts, expected_param_keys(opts))
        opts = cached[1]
        if isinstance(group["lr"], torch.Tensor):  # its value never comes to the host
            scale = _lr_scale_tensor(group["lr"], opts.lr, device, group_dtype(group["params"]))
            opts = dataclasses.replace(opts, lr_scale=scale)
            self._options[index] = (key, opts, cached[2])
            return opts
        check_nonnegative("lr", group["lr"])
        scale = lr_scale(group["lr"], opts.lr)
        if scale != opts.lr_scale:
            opts = dataclasses.replace(opts, lr_scale=float(scale))
            self._options[index] = (key, opts, cached[2])
        return opts

    def _job(self, index: int, group: dict) -> GroupJob:
        """What a backend needs for this group's step (the traced part under torch.compile)."""
        key, opts, _ = self._options[index]
        if torch.compiler.is_compiling():
            # `_init_group` ran only while Dynamo traced, so a later call must not find the
            # options it resolved stale: comparing them here makes Dynamo guard on every
            # option (a change recompiles, and the retrace resolves again) except `lr`. That
            # one enters as a 0-d tensor made by tensor arithmetic, which Dynamo keeps
            # symbolic after its first change, so an LR scheduler recompiles the step once,
            # not at every step. (A float lr_scale would not do: torch.where and
            # torch.tensor specialise a symbolic float, and torch 2.13's Inductor then
            # baked one value without a guard.)
            if _option_key(group, self._option_names) != key:
                opts = _resolve(group, self._kind)
            if self._backends[index].name in _SCALAR_LR_SCALE and not isinstance(group["lr"], torch.Tensor):
                scale = lr_scale(group["lr"], opts.lr)
            else:
                gs = self.group_states[index]
                scale = _lr_scale_tensor(group["lr"], opts.lr, gs["step"].device, gs["step"].dtype)
            opts = dataclasses.replace(opts, lr_scale=scale)
        params, plan, rows = group["params"], self._plans[index], self._row_shardings[index]
        stepping = [params[j] for j in plan.active]
        job = GroupJob(opts, plan, stepping, [p.grad for p in stepping], [self.state[p] for p in stepping],
                       self.group_states[index], grad_scale=getattr(self, "grad_scale", None),
                       found_inf=getattr(self, "found_inf", None), sharding_group=self.sharding_group)
        if rows is not None:  # DTensor parameters: the backends step the local shards
            job.params, job.grads = [fsdp.local(p) for p in job.params], [fsdp.local(g) for g in job.grads]
            job.states = [fsdp.local_state(st) for st in job.states]
            job.sharding_group, job.shards_rows = rows.group, rows.group is not None
        return job

    # -- inspection -----------------------------------------------------------------
    def backends(self) -> list:
        """Per group: the name of the backend its steps run with, what `backend` ("auto"
        included) and torch.optim's `fused` / `foreach` resolve to on the group's device; None
        for a group without parameters. Raises step()'s RuntimeError for one that cannot run."""
        return [_backend_name(g, g["params"][0].device) if g["params"] else None for g in self.param_groups]

    def __repr__(self) -> str:
        # torch.optim's listing of every group option, and the backend each group resolved to
        lines = [self.__class__.__name__ + " ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            lines += [f"    {key}: {group[key]}" for key in sorted(group) if key != "params"]
            try:
                resolved = _backend_name(group, group["params"][0].device) if group["params"] else None
            except RuntimeError as err:
                resolved = f"none ({err})"
            lines.append(f"    resolved backend: {resolved}")
        return "\n".join(lines + [")"])

    def _group_state_or_initial(self, index: int) -> dict:
        group = self.param_groups[index]
        if self.group_states[index] is not None:
            return self.group_states[index]
        opts = _resolve(group, self._kind)
        device = group["params"][0].device
        return new_group_state(opts, self._layouts[index], device, group_dtype(group["params"]))

    def _param_state_or_initial(self, p, opts) -> dict:
        return self.state[p] if self.state.get(p) else new_param_state(p, opts)

    def rates(self) -> list[dict]:
        """Per group: "weights" and each active level's rates (copies; docs/algorithm.md section 4)."""
        out = []
        for index, group in enumerate(self.param_groups):
            opts = _resolve(group, self._kind)
            gs = self._group_state_or_initial(index)
            entry = {"weights": gs["weights"].clone()}
            for level in opts.levels:
                if level == "global":
                    entry[level] = gs["rate_global"].clone()
                    continue
                entry[level] = []
                for p, lay in zip(group["params"], self._layouts[index].tensors):
                    state = fsdp.local_state(self._param_state_or_initial(p, opts))
                    view = rate_view(level, gs, lay, fsdp.local(p), state).to(compute_dtype(p.dtype), copy=True)
                    if level in ("unit", "param"):  # a DTensor parameter's: placed as the parameter
                        view = fsdp.like_param(view.reshape(-1) if level == "unit" else view, p, level == "unit")
                    entry[level].append(view)
            out.append(entry)
        return out

    def effective_rate(self, p: torch.Tensor) -> torch.Tensor:
        """kappa as the last step applied it to p, shaped like p."""
        for index, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    opts = _resolve(group, self._kind)
                    gs = self._group_state_or_initial(index)
                    shard = fsdp.local(p)  # (a DTensor parameter's: its kappa is placed as the parameter)
                    kappa = applied_rate(opts, gs, self._layouts[index].tensors[j], shard,
                                         fsdp.local_state(self._param_state_or_initial(p, opts)))
                    return fsdp.like_param(torch.as_tensor(kappa, device=p.device).expand(shard.shape).clone(), p)
        raise ValueError("effective_rate: the tensor is not a parameter of this optimizer")

    def skipped_steps(self) -> list[int]:
        """Per group: steps skipped because a gradient held NaN or Inf."""
        return [0 if gs is None else int(gs["skipped"]) for gs in self.group_states]

    # -- state dict -----------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["optimizer_kind"] = self._kind
        sd["group_states"] = [None if gs is None else dict(gs) for gs in self.group_states]
        if any(sharding is not None for sharding in self._row_shardings):  # DTensor parameters (FSDP2)
            sd = fsdp.checkpoint_form(sd, [(g["params"], lay) for g, lay in zip(self.param_groups, self._layouts)])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of its torch.optim twin (Adam/AdamW for
        MultiLevelAdam/AdamW, SGD for MultiLevelSGD; same parameters and groups): the twin's
        moments, momentum buffers, max_exp_avg_sq and step counts carry over, its options
        (lr, betas, ...) replace this optimizer's as torch.optim's loading does, and rates and
        weights start afresh at each group's lr."""
        state_dict = fsdp.from_checkpoint_form(state_dict)
        twin = "optimizer_kind" not in state_dict
        if twin:
            self._check_twin_kind(state_dict)

        def merged(saved: dict, current: dict) -> dict:
            # An option a saved group lacks (an older checkpoint; the twin's has no multi-level
            # options) takes this optimizer's value. foreach and fused stay this optimizer's:
            # they choose the backend, which is how this process runs, not state.
            group = {**current, **saved, "foreach": current["foreach"], "fused": current["fused"]}
            if twin:  # rates start at the twin's lr (its base, if its LR scheduler recorded one)
                group["initial_lr"] = _number(saved.get("initial_lr", saved["lr"]))
            return group

        groups = [merged(saved, current) for saved, current in zip(state_dict["param_groups"], self.param_groups)]
        state_dict = {**state_dict, "param_groups": groups + state_dict["param_groups"][len(groups):]}
        if twin:
            state_dict = self._from_twin(state_dict)
        self._check_state_dict(state_dict)
        # The backend is how this process runs a step, not state: the one this optimizer was
        # built with stands (a checkpoint saved under "triton" on a GPU resumes on a CPU).
        chosen = [group["backend"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, backend in zip(self.param_groups, chosen):
            group["backend"] = backend
        # torch casts floating state to the parameter dtype; rates and state stay float32
        # for half parameters, so take every tensor again from the saved dict.
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"].get(pid)
                if saved:
                    self.state[p] = {  # (a step count saved as a number, as older torch.optim did)
                        k: torch.as_tensor(v).to(device=p.device, dtype=torch.float32 if k == "step" else
                                                 compute_dtype(p.dtype), copy=True)
                        for k, v in saved.items()
                    }
        self.group_states = []
        self._state_levels = []
        for group, saved in zip(self.param_groups, state_dict["group_states"]):
            self._state_levels.append(None if saved is None else tuple(group["levels"]))
            if saved is None:
                self.group_states.append(None)
                continue
            device, dtype = group["params"][0].device, group_dtype(group["params"])
            self.group_states.append(
                {k: v.to(device=device, dtype=v.dtype if k == "skipped" else dtype, copy=True) for k, v in saved.items()}
            )
        self._plans = [None] * len(self.param_groups)
        self._options = [None] * len(self.param_groups)

    def _check_twin_kind(self, state_dict: dict) -> None:
        """Refuse a foreign state dict that is not from this class's torch.optim twin."""
        groups = state_dict["param_groups"]
        # (options no other torch.optim optimizer has together: NAdam has betas, RMSprop momentum)
        kind = ("adam" if all("betas" in g and "amsgrad" in g for g in groups) else
                "sgd" if all("nesterov" in g and "dampening" in g for g in groups) else None)
        if kind != self._kind:
            origin = {"adam": "torch.optim Adam", "sgd": "torch.optim SGD", None: "non-multilevel_hd"}[kind]
            raise ValueError(f"state dict is from a {origin} optimizer, not a multilevel_hd {self._kind} one")

    def _from_twin(self, state_dict: dict) -> dict:
        """The twin's state dict (its groups completed with this optimizer's options) in this
        class's format: the state a step needs beyond the twin's at its start values (rates at
        `initial_lr`), group states afresh."""
        groups = state_dict["param_groups"]
        state = {}
        for group, current in zip(groups, self.param_groups):
            opts = _resolve(group, self._kind)
            for pid, p in zip(group["params"], current["params"]):
                saved = state_dict["state"].get(pid)
                if not saved:
                    continue
                state[pid] = {**new_param_state(p, opts), **saved}  # param_rate at lr, prev_direction 0
                if opts.kind == "sgd":  # SGD keeps no count; a momentum buffer means it has stepped
                    state[pid]["step"] = torch.ones((), dtype=torch.float32)
        return {**state_dict, "state": state, "param_groups": groups, "optimizer_kind": self._kind,
                "group_states": [None] * len(groups)}

    def _check_state_dict(self, state_dict: dict) -> None:
        """Refuse a state dict that this optimizer's configuration cannot continue from."""
        kind = state_dict.get("optimizer_kind")
        if kind != self._kind:
            raise ValueError(
                f"state dict is from a {kind or 'non-multilevel_hd'} optimizer, not a multilevel_hd {self._kind} one"
            )
        saved_groups, group_states = state_dict["param_groups"], state_dict.get("group_states")
        if group_states is None or len(group_states) != len(saved_groups) or len(saved_groups) != len(self.param_groups):
            raise ValueError("state dict has a different number of param groups")
        for index, (saved_group, gs) in enumerate(zip(saved_groups, group_states)):
            layout = self._layouts[index]
            if len(saved_group["params"]) != layout.num_layers:
                raise ValueError(f"param group {index} has a different number of parameters")
            opts = _resolve({**saved_group, "backend": self.param_groups[index]["backend"]}, self._kind)
            current_levels = tuple(self.param_groups[index]["levels"])
            if opts.levels != current_levels:
                raise ValueError(
                    f"param group {index} was saved with levels {opts.levels}, this optimizer has {current_levels}"
                )
            if gs is not None:
                shapes = group_state_shapes(opts, layout)
                if set(gs) != set(shapes) or any(tuple(gs[k].shape) != shape for k, shape in shapes.items()):
                    raise ValueError(f"state of param group {index} does not match its levels and parameters")
            keys = expected_param_keys(opts)
            for pid, p in zip(saved_group["params"], self.param_groups[index]["params"]):
                saved = state_dict["state"].get(pid)
                if saved and (set(saved) != keys or any(
                    k != "step" and tuple(v.shape) != tuple(p.shape) for k, v in saved.items()
                )):
                    raise ValueError(f"saved state of a parameter of group {index} does not match its configuration")


def _number(lr):
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def _with_number_lr(group: dict) -> dict:
    """The group as `resolve` reads it: a tensor lr (torch.optim's, 0-d) enters as its base
    `initial_lr`; what it adds, the factor lr / initial_lr, reaches a step as a device tensor
    (`_lr_scale_tensor`), so no step reads it on the host."""
    return {**group, "lr": group["initial_lr"]} if isinstance(group["lr"], torch.Tensor) else group


def _resolve(group: dict, kind: str):
    return resolve(_with_number_lr(group), kind)


def _lr_scale_tensor(lr, base: float, device, dtype) -> torch.Tensor:
    """An LR scheduler's factor (options.lr_scale: lr / base; for a base of 0, 0 while lr is
    0) as a 0-d tensor on `device`, from a float or a tensor lr without reading it (a CPU lr
    is copied without waiting)."""
    scale = torch.ones((), dtype=torch.float64, device=device)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=torch.float64, non_blocking=True)
    scale = scale * lr / base if base > 0 else scale * (lr > 0)
    return scale.to(dtype)


_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _amp_unscale_in_step(choice, fused) -> bool:
    """Whether the optimizer declares `_step_supports_amp_scaling`. None: torch.optim's
    convention, where only a fused optimizer (fused=True) declares it."""
    if choice is None:
        return bool(fused)
    if not isinstance(choice, bool):
        raise TypeError(f"amp_unscale_in_step must be True, False or None, got {choice!r}")
    return choice


def _backend_name(group: dict, device) -> str:
    return backends.resolve_backend(group["backend"], device, group["fused"], group["foreach"])


def _check_torch_optim_flags(group: dict) -> None:
    """torch.optim's implementation keywords: `fused` / `foreach` must agree with `backend`;
    `differentiable=True` cannot be honoured."""
    if group["differentiable"]:
        raise NotImplementedError(
            "differentiable=True is not supported: multilevel_hd steps update parameters, state and "
            "rates in place without autograd (fused kernels included), so no graph through step() exists"
        )
    backends.check_flags(group["backend"], group["fused"], group["foreach"])


# Backends whose kernels take `GroupOptions.lr_scale` as a scalar argument: under
# torch.compile they get a (possibly symbolic) float, the others a 0-d tensor (`_job`).
_SCALAR_LR_SCALE = ("triton",)


def _option_key(group: dict, names: tuple) -> tuple:
    """The group's options `names` as a comparable tuple (dicts and lists as tuples). lr is
    not among them: it enters a step only as lr / initial_lr (`_lr_scale`)."""
    return tuple(_frozen(group.get(k)) for k in names)


def _frozen(value):
    if isinstance(value, dict):
        return tuple((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


_TORCH_OPTIM_KEYWORDS = """

    torch.optim's implementation keywords choose among this package's backends:
    ``fused=True`` a fused one (compiled kernels, one pass over all tensors: on CUDA
    ``triton`` else ``cuda``, on the CPU ``cpp``; a RuntimeError if none can run);
    ``fused=False`` or ``foreach=False`` the ``torch`` backend (PyTorch operations in a loop
    over the tensors, as torch.optim's for-loop implementation); ``foreach=True`` or ``None``
    leave the choice to ``backend="auto"``. A named ``backend`` that contradicts them is a
    ValueError. ``differentiable=True`` raises NotImplementedError: a step updates everything
    in place, outside autograd. ``opt.backends()`` and ``repr(opt)`` name the backend each
    group runs with.

    ``amp_unscale_in_step`` (keyword-only; ``None``: True exactly when ``fused=True``, as
    torch.optim declares it): with True the optimizer declares ``_step_supports_amp_scaling``,
    so ``torch.amp.GradScaler.step`` hands the step its scale and ``found_inf`` and the
    backend unscales the gradients as it reads them, with no pass of the scaler's own and no
    host synchronisation; Lightning then refuses ``gradient_clip_val`` (it cannot clip
    gradients that are still scaled). With False the scaler unscales in a pass of its own
    and reads ``found_inf`` on the host before calling ``step()``, as with torch.optim's
    non-fused optimizers, and every clipping recipe works. Without a GradScaler (float32,
    bfloat16) it changes nothing."""


class MultiLevelSGD(_MultiLevelOptimizer):
    __doc__ = """SGD (optionally with momentum or Nesterov momentum) with multi-level hyper-gradient
    learning rates (docs/algorithm.md sections 2-4).""" + _TORCH_OPTIM_KEYWORDS

    _kind = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, maximize=False, *, levels=DEFAULT_LEVELS, init_weights=None,
                 hypergrad_lr=None, hypergrad_rule=DEFAULT_RULE, hypergrad_scaling="size",
                 combination_lr=None, shrinkage=None, rate_bounds=(0.0, None), hd_decay=0.0,
                 final_lr=None, skip_nonfinite=True, backend="auto", sharding_group=None,
                 foreach=None, fused=None, differentiable=False, amp_unscale_in_step=None):
        if not isinstance(nesterov, bool):  # torch.optim.SGD's fifth positional is weight_decay
            raise TypeError(f"nesterov must be True or False, got {nesterov!r} (pass weight_decay by keyword: "
                            "it comes after nesterov here, before it in torch.optim.SGD)")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
            weight_decay=weight_decay, maximize=maximize, levels=levels,
            init_weights=init_weights, hypergrad_lr=hypergrad_lr, hypergrad_rule=hypergrad_rule,
            hypergrad_scaling=hypergrad_scaling, combination_lr=combination_lr,
            shrinkage=shrinkage, rate_bounds=rate_bounds, hd_decay=hd_decay, final_lr=final_lr,
            skip_nonfinite=skip_nonfinite, backend=backend, foreach=foreach, fused=fused,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, sharding_group, amp_unscale_in_step)


class MultiLevelAdam(_MultiLevelOptimizer):
    __doc__ = """Adam (or AdamW with decoupled_weight_decay=True, AMSGrad with amsgrad=True) with
    multi-level hyper-gradient learning rates (docs/algorithm.md sections 2-4). ``capturable`` is accepted
    and changes nothing: every step is capturable (no host synchronisation).""" + _TORCH_OPTIM_KEYWORDS

    _kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 decoupled_weight_decay=False, maximize=False, *, levels=DEFAULT_LEVELS,
                 init_weights=None, hypergrad_lr=None, hypergrad_rule=DEFAULT_RULE,
                 hypergrad_scaling="size", combination_lr=None, shrinkage=None,
                 rate_bounds=(0.0, None), hd_decay=0.0, final_lr=None, skip_nonfinite=True,
                 backend="auto", sharding_group=None, foreach=None, fused=None, capturable=False,
                 differentiable=False, amp_unscale_in_step=None):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, levels=levels,
            init_weights=init_weights, hypergrad_lr=hypergrad_lr, hypergrad_rule=hypergrad_rule,
            hypergrad_scaling=hypergrad_scaling, combination_lr=combination_lr,
            shrinkage=shrinkage, rate_bounds=rate_bounds, hd_decay=hd_decay, final_lr=final_lr,
            skip_nonfinite=skip_nonfinite, backend=backend, foreach=foreach, fused=fused,
            capturable=capturable, differentiable=differentiable,
        )
        super().__init__(params, defaults, sharding_group, amp_unscale_in_step)


class MultiLevelAdamW(MultiLevelAdam):
    """MultiLevelAdam with decoupled weight decay (default 1e-2), as torch.optim.AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=True, **kwargs):
        # positional arguments as torch.optim.AdamW's (amsgrad sixth, the rest keyword-only)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize, **kwargs)
