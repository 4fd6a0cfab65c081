"""Execute notebooks in colabs/ at their default settings and write them back with their outputs.

  .venv/bin/python tools/record_notebooks.py interop s4d      # names (with or without .ipynb)
  .venv/bin/python tools/record_notebooks.py --all            # every notebook in colabs/

Each notebook runs in a fresh kernel with cwd and JAXLAB_NOTEBOOK_WORKDIR set to a new temp directory,
JAXLAB_SMOKE and MPLBACKEND unset (so its default, non-smoke settings run and inline PNGs are recorded). The
outputs are then cleaned: machine paths (the temp dir, the checkout, /work, /home, /tmp, /Users) are replaced by
placeholders, stderr (warnings, progress bars) is dropped unless --keep-stderr, consecutive prints are merged,
execution metadata (timings) is dropped, execution counts run 1, 2, ... A notebook whose run raised
an error, whose PNGs exceed --max-png bytes, or that records no figure is not written back (exit status 1).
"""

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
# any absolute path under a machine-specific root, up to whitespace, a quote or a closing bracket
MACHINE_PATH = re.compile(r"(?:/private)?/(?:work|home|tmp|Users|var/folders)/[^\s'\"(),\[\]{}<>]*")


def clean_text(text, replacements):
  for old, new in replacements:
    text = text.replace(old, new)
  return MACHINE_PATH.sub("<path>", text)


def _clean(value, replacements):
  if isinstance(value, str):
    return clean_text(value, replacements)
  if isinstance(value, list):
    return [_clean(v, replacements) for v in value]
  return value


def clean_outputs(nb, replacements, drop_stderr=True):
  """Replace machine paths in text outputs, merge consecutive prints, drop stderr (warnings, progress bars:
  machine noise) unless asked to keep it, drop timings and widget state, renumber execution counts."""
  count = 0
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type != "code":
      continue
    outputs = []
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        if drop_stderr and out.name == "stderr":
          continue
        out.text = _clean(out.text, replacements)
        if outputs and outputs[-1].output_type == "stream" and outputs[-1].name == out.name:
          outputs[-1].text += out.text  # one block per run of consecutive prints
          continue
      elif out.output_type == "error":
        out.evalue = _clean(out.evalue, replacements)
        out.traceback = _clean(out.traceback, replacements)
      if "data" in out:
        for mime in list(out.data):
          if mime.startswith("text/") or mime.endswith("json"):
            out.data[mime] = _clean(out.data[mime], replacements)
      if "execution_count" in out:
        out.execution_count = count + 1
      outputs.append(out)
    cell.outputs = outputs
    count += 1
    cell.execution_count = count
  nb.metadata.pop("widgets", None)
  nb.metadata.pop("papermill", None)
  return nb


def check(nb, max_png):
  """Problems that keep a recorded notebook from being written back."""
  outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  problems = [f"error: {o.ename}: {o.evalue}" for o in outs if o.output_type == "error"]
  pngs = [o.data["image/png"] for o in outs if "image/png" in o.get("data", {})]
  if not pngs:
    problems.append("no figure (image/png output)")
  problems += [f"PNG of {len(p):,} bytes > {max_png:,}" for p in pngs if len(p) >= max_png]
  return problems


def record(path, timeout, max_png, drop_stderr=True, dry_run=False):
  import nbclient
  import nbformat
  nb = nbformat.read(path, as_version=4)
  tmp = tempfile.mkdtemp(prefix="record_nb_")
  workdir = os.path.join(tmp, "work")
  os.makedirs(workdir)
  saved = {k: os.environ.get(k) for k in ("JAXLAB_SMOKE", "MPLBACKEND", "JAXLAB_NOTEBOOK_WORKDIR")}
  os.environ.pop("JAXLAB_SMOKE", None)
  os.environ.pop("MPLBACKEND", None)
  os.environ["JAXLAB_NOTEBOOK_WORKDIR"] = workdir
  start = time.time()
  try:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                     allow_errors=True, resources={"metadata": {"path": tmp}})
    client.execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  seconds = time.time() - start
  real_tmp = os.path.realpath(tmp)
  replacements = [(p, "<tmp>") for p in sorted({workdir, os.path.realpath(workdir)}, key=len, reverse=True)]
  replacements += [(real_tmp, "<tmp>"), (tmp, "<tmp>"), (ROOT, "<repo>"), (os.path.expanduser("~"), "~")]
  clean_outputs(nb, replacements, drop_stderr)
  problems = check(nb, max_png)
  shutil.rmtree(tmp, ignore_errors=True)
  name = os.path.basename(path)
  if problems:
    print(f"{name}: NOT written ({seconds:.0f} s): " + "; ".join(problems), flush=True)
    return False, seconds
  if not dry_run:
    nbformat.write(nb, path)
  print(f"{name}: recorded in {seconds:.0f} s" + (" (dry run, not written)" if dry_run else ""), flush=True)
  return True, seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("names", nargs="*", help="notebook names in colabs/ (e.g. interop or interop.ipynb)")
  parser.add_argument("--all", action="store_true", help="every notebook in colabs/")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
  parser.add_argument("--max-png", type=int, default=400_000, help="largest PNG (base64 bytes) accepted")
  parser.add_argument("--keep-stderr", action="store_true", help="keep stderr streams (by default warnings and "
                      "progress bars are dropped)")
  parser.add_argument("--dry-run", action="store_true", help="execute and check, do not write back")
  args = parser.parse_args(argv)
  if args.all == bool(args.names):
    parser.error("give notebook names or --all")
  paths = (sorted(glob.glob(os.path.join(COLABS, "*.ipynb"))) if args.all else
           [os.path.join(COLABS, n if n.endswith(".ipynb") else n + ".ipynb") for n in args.names])
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    parser.error(f"no such notebook: {missing}")
  ok = True
  for path in paths:
    written, _ = record(path, args.timeout, args.max_png, not args.keep_stderr, args.dry_run)
    ok &= written
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
