//! Python scripts the tests and benchmarks run as jobs.

/// A small PyTorch Lightning training run on random data, CPU only, with a
/// `ModelCheckpoint(monitor="val_loss")`; it ends by printing `best <path> <sha256>` of the best
/// checkpoint, so a test can compare it with what it downloads.
///
/// Options: `--epochs N` (5), `--batch N` (16), `--step-sleep S` (0.08 s per training step, so
/// progress can be watched moving), `--crash-at EPOCH` (raise in that epoch), `--samples N`
/// (256), `--hidden N` (0: a single linear layer), `--out DIR` (`checkpoints`).
pub const LIGHTNING_TRAIN: &str = r#"
import argparse, hashlib, os, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--step-sleep", type=float, default=0.08)
p.add_argument("--crash-at", type=int, default=-1)
p.add_argument("--samples", type=int, default=256)
p.add_argument("--hidden", type=int, default=0)
p.add_argument("--out", default="checkpoints")
args = p.parse_args()

class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        h = args.hidden
        self.net = nn.Sequential(nn.Linear(8, h), nn.ReLU(), nn.Linear(h, 1)) if h else nn.Linear(8, 1)
    def training_step(self, batch, _):
        if self.current_epoch == args.crash_at:
            raise RuntimeError(f"boom in epoch {args.crash_at}")
        if args.step_sleep:
            time.sleep(args.step_sleep)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss
    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

torch.manual_seed(0)
n = args.samples
x = torch.randn(n, 8)
y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1)
split = n * 3 // 4
train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=args.batch)
val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=max(args.batch, 32))
ckpt = ModelCheckpoint(monitor="val_loss", mode="min", dirpath=args.out)
trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                    enable_model_summary=False, callbacks=[ckpt], default_root_dir=os.path.dirname(os.path.abspath(args.out)))
trainer.fit(Model(), train, val)
print("best", ckpt.best_model_path, hashlib.sha256(open(ckpt.best_model_path, "rb").read()).hexdigest())
"#;

/// A model server for the checkpoint `LIGHTNING_TRAIN` leaves (a linear layer, 8 inputs):
/// loads `$RUNYARD_CHECKPOINT` with torch at start, answers `POST /predict` (`{"x": [8
/// floats]}`, or a batch: a JSON array of them) with `{"y": ...}`, and `GET /model` with the
/// checkpoint's sha256 and state-dict keys.
pub const LIGHTNING_SERVE: &str = r#"import hashlib, json, os
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
import torch

path = os.environ["RUNYARD_CHECKPOINT"]
state = torch.load(path, weights_only=False)["state_dict"]
w, b = state["net.weight"][0], state["net.bias"][0]
digest = hashlib.sha256(open(path, "rb").read()).hexdigest()

def predict(x):
    return {"y": float(torch.dot(w, torch.tensor(x, dtype=w.dtype)) + b)}

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply({"sha256": digest, "keys": sorted(state), "file": os.path.basename(path)})
    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if self.headers.get("x-runyard-batch-size"):
            return self.reply([predict(d["x"]) for d in data])
        self.reply(predict(data["x"]))

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;
