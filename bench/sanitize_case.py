"""A small forward+backward through every CUDA kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_case.py
    compute-sanitizer --tool racecheck python bench/sanitize_case.py

Covers fp32 and bf16, softmax and none, lengths and a mask with an empty row,
training-mode Dice (statistics and reduce passes), a four-layer MLP with a
width-1 layer, and D=37.  Prints "sanitize_case: ok" at the end.
"""

import torch

import din_fused


def params(D, hidden, act, dtype, gen):
    dims = [4 * D, *hidden, 1]
    p = {"weights": [(torch.randn(dims[i + 1], dims[i], generator=gen) * dims[i] ** -0.5).cuda().to(dtype)
                     .requires_grad_() for i in range(len(dims) - 1)],
         "biases": [(torch.randn(dims[i + 1], generator=gen) * 0.1).cuda().to(dtype).requires_grad_()
                    for i in range(len(dims) - 1)],
         "activation": act}
    if act in ("prelu", "dice"):
        p["alphas"] = [torch.full((h,), 0.2, device="cuda", dtype=dtype, requires_grad=True) for h in hidden]
    if act == "dice":
        p["bn_weights"] = [torch.ones(h, device="cuda", dtype=dtype, requires_grad=True) for h in hidden]
        p["bn_biases"] = [torch.zeros(h, device="cuda", dtype=dtype, requires_grad=True) for h in hidden]
        p["running_means"] = [torch.zeros(h, device="cuda", dtype=dtype) for h in hidden]
        p["running_vars"] = [torch.ones(h, device="cuda", dtype=dtype) for h in hidden]
    return p


def case(B, T, D, hidden, act, norm, dtype, use_mask, training, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen).cuda().to(dtype).requires_grad_()
    k = torch.randn(B, T, D, generator=gen).cuda().to(dtype).requires_grad_()
    lengths = torch.randint(0, T + 1, (B,), generator=gen).cuda()
    lengths[0] = 0
    mask = None
    if use_mask:
        mask = (torch.rand(B, T, generator=gen) < 0.7).cuda()
        mask[1] = False
    p = params(D, hidden, act, dtype, gen)
    out, w = din_fused.din_attention(q, k, lengths, mask, normalization=norm, training=training,
                                     return_scores=True, **p)
    loss = out.float().square().sum() + w.float().sum()
    leaves = [q, k] + [t for key in ("weights", "biases", "alphas", "bn_weights", "bn_biases")
                       for t in p.get(key, [])]
    grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in grads)


CASES = [
    # B, T, D, hidden, activation, normalization, dtype, mask, training
    (6, 70, 37, (12, 7), "sigmoid", "softmax", torch.float32, True, False),       # FFMA kernels
    (6, 70, 16, (16, 8), "relu", "none", torch.bfloat16, False, False),           # tensor-core kernels
    (5, 40, 8, (4, 1, 3, 2), "dice", "softmax", torch.float32, True, True),       # Dice stats + reduce passes
    (5, 30, 64, (80, 40), "prelu", "softmax", torch.bfloat16, True, False),       # tensor cores, 2 tiles
    (40, 3, 7, (9, 5), "dice", "softmax", torch.float16, True, True),             # tiles spanning rows
    (4, 9, 300, (256,), "sigmoid", "none", torch.float32, False, False),          # unfolded FFMA first layer
]

if __name__ == "__main__":
    failed = 0
    for i, c in enumerate(CASES):
        try:
            case(*c, seed=i)
        except Exception as e:  # keep going: the other kernels still get checked
            failed += 1
            print(f"sanitize_case: case {i} {c[4]} {c[6]} raised {type(e).__name__}: {e}", flush=True)
    print("sanitize_case: ok" if not failed else f"sanitize_case: {failed} of {len(CASES)} cases raised")
