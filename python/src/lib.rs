use pyo3::prelude::*; #[pymodule] fn troops(_m: &Bound<PyModule>) -> PyResult<()> { Ok(()) }
