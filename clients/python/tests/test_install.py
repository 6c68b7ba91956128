"""`pip install clients/python` into a fresh virtual environment, offline:
the installed package (not the checkout's) imports, finds libgorgon through
GORGON_LIBRARY and generates the golden text."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import _support

LILY = "stories260K/golden_greedy_prompt_LilyAndTom_n64.txt"

CHECK = r"""
import sys
import gorgon
print(gorgon.__file__)
with gorgon.Client() as c:
    sys.stdout.write("Lily and Tom" + c.complete("Lily and Tom", max_tokens=60) + "\n")
"""


class InstallTest(unittest.TestCase):
    def test_pip_install_into_a_venv(self):
        with tempfile.TemporaryDirectory(prefix="gorgon-pip-") as d:
            # A copy of the package: pip builds in the source tree (egg-info,
            # build/), which must not land in the checkout.
            src = os.path.join(d, "src")
            shutil.copytree(_support.PKG, src,
                            ignore=shutil.ignore_patterns("tests", "__pycache__", "build",
                                                          "*.egg-info"))
            venv = os.path.join(d, "venv")
            # --system-site-packages: setuptools' bdist_wheel needs the
            # `wheel` module (Debian's python3-wheel); no network is used.
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv],
                           check=True, timeout=300)
            py = os.path.join(venv, "bin", "python")
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("PIP_") and k != "PYTHONPATH"}
            env["PIP_CONFIG_FILE"] = os.devnull
            p = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                                "--disable-pip-version-check", src],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               cwd=d, timeout=300)
            self.assertEqual(p.returncode, 0, p.stdout.decode())
            self.assertIn("Successfully installed gorgon-", p.stdout.decode())
            # Run outside the checkout, so only the installed copy can import.
            p = subprocess.run([py, "-c", CHECK], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=d, timeout=120)
            self.assertEqual(p.returncode, 0, p.stderr.decode())
            where, text = p.stdout.decode().split("\n", 1)
            self.assertTrue(where.startswith(os.path.join(venv, "lib")), where)
            self.assertEqual(text, _support.read_golden(LILY))


if __name__ == "__main__":
    unittest.main()
