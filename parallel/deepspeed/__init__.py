"""DeepSpeed engine support for our own expert-parallel MoE layers (stacked expert weights).

Our MoE layers hold all experts of a rank as stacked parameters ([E_local, ...], expert dim first)
and do their own all-to-all; they do not subclass `deepspeed.moe.layer.MoE`. The DeepSpeed engine
(0.19.x) turns on its expert-parallel machinery only when it finds an instance of that class in the
model, and then needs, per expert parameter, `param.allreduce = False` and `param.group_name`. With
that in place it does, for ZeRO 0, 1 and 2 (fp32 and bf16):

  * broadcast at init: expert params only inside their expert-data-parallel (EDP) group (ranks that
    hold the same experts); dense params over all ranks;
  * gradients: expert grads summed over the EDP group and divided by the full data-parallel world
    size W (so the result equals EP=1); dense grads averaged over W;
  * ZeRO 1/2: expert params go into separate optimizer param groups partitioned over the EDP group;
  * ZeRO 1/2 grad-norm clipping: global norm equals EP=1.

One module per concern:

  * `engine`: the groups, the marker, the optimizer's parameter groups, `check_config`, `make_engine`.
    1. `ensure_expert_groups(ep_size)` after `deepspeed.init_distributed()` and before building the
       layers' all-to-all: our dispatch must use exactly DeepSpeed's EP group.
    2. `mark_expert_params(model, ep_size, num_experts)` before `deepspeed.initialize`: tags the expert
       parameters and attaches a parameter-less `DeepSpeedMoEMarker` so the engine sees an MoE model.
    3. Build the optimizer from `optimizer_param_groups(model)` (expert params split into `moe`
       groups, which ZeRO 1/2 require), or call `make_engine`, which does all three.
  * `clipping`: EP-correct gradient clipping for ZeRO 0 (DeepSpeed's is not, see below).
  * `expert_files`: checkpoints. DeepSpeed's MoE checkpoint path cannot save stacked experts (it keys on
    `deepspeed_moe.experts.deepspeed_experts.N` names of `MoE` modules); with the marker it saves
    nothing for experts and its model file would hold only DP-rank-0's expert slice. `save_checkpoint` /
    `load_checkpoint` strip expert tensors from DeepSpeed's model file and write them once per
    expert-parallel rank to `<dir>/<tag>/experts_ep<r>_of_<ep>.pt`; on load they are merged back through
    DeepSpeed's `custom_load_fn`, before the engine restores ZeRO partitions / refreshes fp32 masters.
  * `optimizer_state`: each parameter's Adam state by name, whatever holds it, so a checkpoint reshards
    to another world or EP size.
  * `safe_load`: every file DeepSpeed or we read back is unpickled with `weights_only=True` (DeepSpeed's
    engine gets a checkpoint engine of ours that does so); nothing in a checkpoint ever runs.

Known DeepSpeed shortfalls (0.19.8), refused by `engine.check_config`:
  * ZeRO 0 gradient clipping is not EP=1: fp32 (runtime.utils.clip_grad_norm_) averages the
    per-rank norms; bf16/fp16 (FP16_UnfusedOptimizer) leaves expert grads out of the norm. Set
    `gradient_clipping: 0` and call `clipping.clip_grad_norm_ep(model, max_norm)` between
    `engine.backward` and `engine.step` (at the accumulation boundary), or use ZeRO 1/2.
  * ZeRO 1 with `contiguous_gradients: false` silently all-reduces expert grads over all ranks
    (DeepSpeed only warns). ZeRO 2 asserts contiguous_gradients, ZeRO 1/2 assert reduce_scatter.
  * ZeRO 3 is not supported with this marker (DeepSpeed refuses native MoE layers at stage 3).
"""
