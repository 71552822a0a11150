# The project's entry points. `make test` and `make demo` work on a fresh
# machine: `setup` installs everything they need and is idempotent.
PYTHON ?= python3
CC     ?= cc
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test bench lint demo demo-systemd clean deb

NATIVE := offload/_native/rexec-exec offload/_native/libudsproxy.so offload/_native/.shim-built
PYFUSE3 := $(VENV)/.pyfuse3-cache-readdir

setup: $(STAMP) $(NATIVE) $(PYFUSE3)
	@sh scripts/setup-system.sh
	@# What pip does on a real install; the stand-in starts for every remote
	@# program and must not compile its modules each time.
	@$(PY) -m compileall -q offload

offload/_native/rexec-exec: native/rexec_exec.c
	mkdir -p offload/_native
	$(CC) -O2 -Wall -Wextra -Werror -o $@ $<

# The LD_PRELOAD payload: plain C against libc, bound at load (-z now).
offload/_native/libudsproxy.so: native/qtfs_shim.c
	mkdir -p offload/_native
	$(CC) -O2 -Wall -Wextra -Werror -fPIC -shared -Wl,-z,now -o $@ $< -ldl

# The same source as a cffi module, for in-process tests of its helpers.
offload/_native/.shim-built: native/qtfs_shim.c native/build_shim.py $(STAMP)
	mkdir -p offload/_native
	$(PY) native/build_shim.py
	touch $@

# pyfuse3 with the kernel's directory listing cache (native/pyfuse3/).
$(PYFUSE3): native/pyfuse3/cache-readdir.patch scripts/build-pyfuse3 $(STAMP)
	sh scripts/build-pyfuse3 $(PY)
	touch $@

$(STAMP): pyproject.toml
	@sh scripts/setup-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

lint: setup
	$(VENV)/bin/ruff check offload tests bench
	$(VENV)/bin/ruff format --check offload tests bench
	$(VENV)/bin/mypy

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

demo: setup
	$(PY) -m offload.lab.demo

# The package built from the working tree, installed with apt into two
# containers booted with systemd (host and DPU), every unit enabled, a VM
# started from the DPU: offload/lab/systemd_lab.py.
demo-systemd: setup
	$(PY) -m offload.lab.systemd_cli demo

# The Debian package (debian/), built from the working tree in build/deb/.
deb:
	@sh scripts/setup-system.sh
	bash scripts/build-deb

clean:
	rm -rf $(VENV) build *.egg-info
