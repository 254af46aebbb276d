"""The local stand-in of WMLA's EDI runtime (`redhareapi`): task contexts, the kernel base, the HTTP
endpoint, the kernel pool behind `serve --kernels N`, and the demo and hostile-load bench that drive them."""
