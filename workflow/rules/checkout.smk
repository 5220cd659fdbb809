# Committed results on a fresh clone. Git gives every file of a checkout the time it was written, in no particular
# order, so a committed input (results/policy/policy.pt) can look newer than the outputs made from it and
# `snakemake -n all` would plan an hour of reruns that overwrite the committed results. Once per clone (before any
# rule is planned), every committed file under results/ whose content is unchanged from HEAD gets the time of the last
# commit that wrote it: outputs committed with or after their inputs are then up to date, and an input committed after
# its outputs (a real staleness) still triggers a rerun. Files that differ from HEAD (a local run) are never touched.
import os
import subprocess


def settle_checkout_mtimes(repo, tree="results"):
    marker = os.path.join(repo, ".snakemake", "sol_checkout_mtimes")
    if os.path.exists(marker):
        return

    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True).stdout

    try:
        if git("rev-parse", "--show-toplevel").strip() != os.path.realpath(repo):
            return  # not a checkout of this project (an installed copy of the workflow)
        changed = set(git("diff", "--name-only", "HEAD", "--", tree).split("\n"))
        log = git("log", "--format=%x00%ct", "--name-only", "--", tree)
    except (OSError, subprocess.CalledProcessError):
        return  # no git: nothing to settle
    newest = {}
    for entry in log.split("\0")[1:]:  # newest commit first: the first time a path appears is its last commit
        stamp, *paths = entry.strip().split("\n")
        for path in filter(None, paths):
            newest.setdefault(path, int(stamp))
    for path, stamp in newest.items():
        full = os.path.join(repo, path)
        if path not in changed and os.path.isfile(full):
            os.utime(full, (stamp, stamp))
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"{len(newest)} committed files under {tree}/ set to their last commit's time\n")


settle_checkout_mtimes(workflow.basedir)
