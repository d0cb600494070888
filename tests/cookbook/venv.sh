# Sourced from the repository root after bench/reference.sh: makes sure the tinker-cookbook
# virtualenv exists and exports HEARTH_COOKBOOK_PYTHON. tinker-cookbook 0.5.8 pins an older
# transformers than the reference has, so it lives in its own virtualenv layered over the
# reference (a .pth line puts the reference's site-packages after its own: torch and the tinker SDK
# come from the reference, transformers 5.5 from here). Per user, in ~/.cache/hearth, shared by
# every clone.
COOKBOOK_VENV="${HEARTH_COOKBOOK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth/cookbook-venv}"
if ! "$COOKBOOK_VENV/bin/python" -c "import tinker_cookbook, tinker, torch, pytest" >/dev/null 2>&1; then
  echo "installing tinker-cookbook 0.5.8 into $COOKBOOK_VENV (over the reference virtualenv) ..." >&2
  rm -rf "$COOKBOOK_VENV"
  "$(readlink -f bench/.venv)/bin/python" -m venv "$COOKBOOK_VENV"
  ref_site="$(bench/.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  own_site="$("$COOKBOOK_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  echo "$ref_site" > "$own_site/zz_hearth_reference.pth"
  "$COOKBOOK_VENV/bin/pip" install -q --disable-pip-version-check tinker-cookbook==0.5.8
  unset ref_site own_site
fi
export HEARTH_COOKBOOK_PYTHON="$COOKBOOK_VENV/bin/python"
