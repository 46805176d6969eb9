import unittest

import helpers


class HelpersTest(unittest.TestCase):
    def test_cut_keeps_whole_characters(self):
        self.assertEqual(helpers.cut("héllo", 2), ("h", True))
        self.assertEqual(helpers.cut("hi", 8), ("hi", False))

    def test_colour_codes_are_stripped(self):
        self.assertEqual(helpers.strip_ansi("\x1b[31mValueError\x1b[0m: x"), "ValueError: x")

    def test_big_outputs_are_promoted_only_when_allowed(self):
        self.assertEqual(helpers.decide(5, False, False, 10, 100), "inline")
        self.assertEqual(helpers.decide(50, False, True, 10, 100), "promote")
        self.assertEqual(helpers.decide(50, False, False, 10, 100), "requires-artifact-promotion")


if __name__ == "__main__":
    unittest.main()
