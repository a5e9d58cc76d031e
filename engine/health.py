r"""Training health: the readings of every --log-every training step — the predicted (and true) foreground fraction
of the batch and a plug-in's own (CD-TG: its text term's share of the features, how alike the text makes the
prototypes of different classes, ...) — written to log.txt, TensorBoard (`health/...`), `health.json` (the last
reading, for scripts) and `health.jsonl` (every reading), with the plug-in's warnings."""
import json

#: Short names of the readings in log.txt (TensorBoard and the JSON files use the keys).
LABELS = {'fg_fraction': 'fg', 'gt_fg_fraction': 'true fg', 'u_over_f': '|u|/|F|',
          'text_proto_cos': 'max cos(TP_i,TP_j)', 'text_proto_cos_mean': 'mean cos(TP_i,TP_j)',
          'tp_bp_cos': 'cos(TP,BP_t)', 'fp_fused_cos': "cos(FP,FP')", 'text_weight': 'text weight',
          'grad_norm_cdtg': 'CD-TG grad norm'}


def format_readings(readings: dict) -> str:
    r"""One line: 'fg 0.121 | true fg 0.104 | |u|/|F| 0.30 0.30 0.30 | ...' (per-level lists as one value each)."""
    def number(v) -> str:
        return '-' if v is None else f'{v:.3f}'
    parts = []
    order = {key: i for i, key in enumerate(LABELS)}
    for key, value in sorted(readings.items(), key=lambda kv: order.get(kv[0], len(order))):
        label = LABELS.get(key, key)
        parts.append(f'{label} {" ".join(map(number, value)) if isinstance(value, list) else number(value)}')
    return ' | '.join(parts)


class HealthLog:
    r"""Receives a run's readings (`record`) and writes them where a user and a script look; `folder` None (the
    other processes of a distributed run) writes no file."""

    def __init__(self, log, hooks, folder):
        self.log, self.hooks, self.folder = log, hooks, folder

    def record(self, step: int, epoch: int, readings: dict) -> None:
        warnings = self.hooks.check_health(readings, step)
        for message in warnings:
            self.log.info(f'warning: {message}')
        for key, value in readings.items():
            for suffix, v in ([(f'/level{i}', x) for i, x in enumerate(value)] if isinstance(value, list)
                              else [('', value)]):
                if v is not None:
                    self.log.scalar(f'health/{key}{suffix}', v, step)
        self.log.info(f'step {step} health: {format_readings(readings)}')
        if self.folder is None:
            return
        entry = {'step': step, 'epoch': epoch, **readings, 'warnings': warnings}
        self.log.write_json('health.json', entry)
        with open(self.folder / 'health.jsonl', 'a') as f:
            f.write(json.dumps(entry) + '\n')
