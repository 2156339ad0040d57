"""tests/llada_reference.py: an independent, deliberately plain restatement of LLaDA's reference sampler (from the
facts of the official LLaDA code: float64 softmax over the whole vocabulary, a python loop over rows), used for parity."""
import torch


def reference_generate(logits_fn, prompt, gen_length, steps, block_length, mask_id, temperature=0.0,
                       remasking="low_confidence", cfg_scale=0.0):
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for b in range(num_blocks):
        lo = prompt.shape[1] + b * block_length
        hi = lo + block_length
        n_masked = (x[:, lo:hi] == mask_id).sum(dim=1)
        counts = []
        for row in range(x.shape[0]):
            n = int(n_masked[row])
            counts.append([n // steps + (1 if s < n % steps else 0) for s in range(steps)])
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = logits_fn(x)
                un_logits = logits_fn(un_x)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = logits_fn(x)
            if temperature > 0:
                raise NotImplementedError("the parity tests use greedy decoding")
            x0 = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                raise NotImplementedError
            x0_p[:, hi:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-float("inf"), dtype=torch.float64))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(x.shape[0]):
                k = counts[row][i]
                if k:
                    transfer[row, torch.topk(confidence[row], k=k).indices] = True
            x[transfer] = x0[transfer]
    return x[:, prompt.shape[1]:]
