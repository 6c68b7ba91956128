"""The ctypes structures have the C layout: every size, alignment and field
offset equals what the C compiler gives for gorgon.h (written by
tests/python/test_python.c into $GORGON_TEST_LAYOUT), and the constants the
package copies equal the header's."""

import ctypes
import unittest

import _support
from _support import gorgon  # noqa: F401  (puts the package on sys.path)
from gorgon import _lib


def read_layout():
    structs, fields, consts = {}, {}, {}
    with open(_support.env("GORGON_TEST_LAYOUT")) as f:
        for line in f:
            kind, name, *vals = line.split()
            if kind == "S":
                structs[name] = (int(vals[0]), int(vals[1]))
            elif kind == "F":
                fields[name] = (int(vals[0]), int(vals[1]))
            elif kind == "C":
                consts[name] = vals[0]
    return structs, fields, consts


class LayoutTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.structs, cls.fields, cls.consts = read_layout()

    def test_every_struct_is_declared_and_sized(self):
        self.assertEqual(set(self.structs), set(_lib.STRUCTS))
        for cname, (size, align) in self.structs.items():
            py = _lib.STRUCTS[cname]
            self.assertEqual(ctypes.sizeof(py), size, cname)
            self.assertEqual(ctypes.alignment(py), align, cname)

    def test_every_field_offset_and_size(self):
        seen = set()
        for cname, py in _lib.STRUCTS.items():
            for fname, _ in py._fields_:
                key = "%s.%s" % (cname, fname)
                self.assertIn(key, self.fields, "%s is not a field of the C struct" % key)
                off, size = self.fields[key]
                desc = getattr(py, fname)
                self.assertEqual(desc.offset, off, key)
                self.assertEqual(desc.size, size, key)
                seen.add(key)
        self.assertEqual(seen, set(self.fields), "C fields missing from the ctypes structs")

    def test_constants(self):
        for name in ("GORGON_GEN_MAX_STOP", "GORGON_GEN_PROMPT_IDS", "GORGON_GEN_WANT_IDS",
                     "GORGON_GEN_NO_MEDUSA", "GORGON_TOK_ADD_BOS", "GORGON_BUSY_POLL",
                     "GORGON_NO_SPIN", "GORGON_GROUP_MAX_RANKS"):
            self.assertEqual(getattr(_lib, name), int(self.consts[name]), name)
        finish = {int(k.split(".")[1]): v for k, v in self.consts.items()
                  if k.startswith("finish.")}
        self.assertEqual(finish, _lib.FINISH_NAMES)


if __name__ == "__main__":
    unittest.main()
