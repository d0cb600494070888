"""jupyter_kernel_test against the hearth kernel, with Rust samples."""

import unittest

import jupyter_kernel_test as jkt

from conftest import execute


class HearthKernelTests(jkt.KernelTests):
    kernel_name = "hearth"
    language_name = "rust"
    file_extension = ".rs"

    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("oops");'
    completion_samples = [{"text": "let v: Vec<u8> = Vec::with_capa", "matches": {"with_capacity"}}]
    complete_code_samples = ["1 + 1", "let x = 1;", "fn f() {}", ":status"]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,", 'let s = "open']
    invalid_code_samples = ["1 + 1)", "fn f() { ] }"]
    code_generate_error = 'let n: u32 = "not a number";'
    code_execute_result = [{"code": "6 * 7", "result": "42"}, {"code": "\"warm\".len()", "result": "4"}]
    code_display_data = [
        {"code": 'hearth::Bundle::text("x").with("text/html", "<b>hi</b>").show();', "mime": "text/html"},
        {"code": "hearth::Plot::new(\"p\", \"x\", \"y\").series(\"s\", vec![(0.0, 1.0), (1.0, 0.5)]).show();", "mime": "image/svg+xml"},
    ]
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "6 *"
    code_inspect_sample = "session"
    code_clear_output = "hearth::clear_output(false);"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # the first cell waits for evcxr and the prelude (seconds); jupyter_kernel_test allows
        # each request 15 s, so let the kernel get ready before the timed tests
        execute(cls.kc, "1", timeout=600)


class HearthIopubWelcomeTests(jkt.IopubWelcomeTests):
    kernel_name = "hearth"
    support_iopub_welcome = True


if __name__ == "__main__":
    unittest.main()
