{
  # Nix users: `nix develop` (a shell with every tool CI and the release use), `nix build` (the packages).
  # The versions of our packages come from their pyproject.toml; `minimumVersions` below must match the
  # lower bounds there (packages/retention/tests/test_environment.py checks it) and is asserted against nixpkgs.
  # Pin nixpkgs exactly with `nix flake lock` (commit the flake.lock it writes).
  description = "retention: power retention (symmetric power attention with gating) at linear cost";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    flake-utils.lib.eachSystem [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ] (system:
      let
        pkgs = import nixpkgs { inherit system; };
        lib = pkgs.lib;
        python = pkgs.python311;
        py = python.pkgs;

        # Lower bounds of the packages' pyproject.toml dependencies (PyPI names).
        minimumVersions = {
          torch = "2.4";
          numpy = "1.24";
          numba = "0.59";
          scipy = "1.10";
          threadpoolctl = "3";
          triton = "3.2";
          tqdm = "4.66";
          matplotlib = "3.7";
          hatchling = "1.24";
          scikit-build-core = "0.11";
        };
        checked = name: drv:
          assert lib.assertMsg (lib.versionAtLeast drv.version minimumVersions.${name})
            "nixpkgs has ${name} ${drv.version}, retention needs >= ${minimumVersions.${name}}";
          drv;
        torch = checked "torch" py.torch;
        numpy = checked "numpy" py.numpy;
        numba = checked "numba" py.numba;
        scipy = checked "scipy" py.scipy;
        threadpoolctl = checked "threadpoolctl" py.threadpoolctl;
        tqdm = checked "tqdm" py.tqdm;
        matplotlib = checked "matplotlib" py.matplotlib;
        hatchling = checked "hatchling" py.hatchling;
        scikit-build-core = checked "scikit-build-core" py.scikit-build-core;
        # Triton is built for Linux x86_64 only (as in the pyproject markers).
        triton = if system == "x86_64-linux" then [ (checked "triton" py.triton) ] else [ ];

        # One package of packages/<dir>, its version read from its pyproject.toml, built with buildSystem.
        monorepoPackageWith = buildSystem: dir: dependencies:
          let project = (builtins.fromTOML (builtins.readFile ./packages/${dir}/pyproject.toml)).project;
          in py.buildPythonPackage {
            pname = project.name;
            version = project.version;
            pyproject = true;
            src = ./packages/${dir};
            build-system = buildSystem;
            inherit dependencies;
            # The tests need the float64 oracle and small shapes only; CI runs them, the build does not.
            doCheck = false;
          };

        monorepoPackage = monorepoPackageWith [ hatchling ];
        # retention-kernels builds with scikit-build-core + CMake; without nvcc in the sandbox it builds
        # Triton-only (RETENTION_SKIP_CUDA), as its sdist does on any machine without nvcc.
        kernelsPackage = dependencies: (monorepoPackageWith [ scikit-build-core ] "retention-kernels" dependencies) // {
          nativeBuildInputs = [ pkgs.cmake pkgs.ninja ];
          dontUseCmakeConfigure = true;
          env.RETENTION_SKIP_CUDA = "1";
        };

        retention-core = monorepoPackage "retention-core" [ torch numpy numba scipy threadpoolctl ];
        retention-kernels = kernelsPackage ([ retention-core ] ++ triton);
        retention-train = monorepoPackage "retention-train" [ retention-core numpy tqdm matplotlib ];
        retention = monorepoPackage "retention" ([ retention-core ]
          ++ lib.optional (system == "x86_64-linux") retention-kernels);
      in
      {
        packages = {
          inherit retention retention-core retention-kernels retention-train;
          default = retention;
        };

        devShells.default = pkgs.mkShell {
          packages = [
            (python.withPackages (ps: [
              torch numpy numba scipy threadpoolctl tqdm matplotlib hatchling scikit-build-core
              ps.pytest ps.hypothesis ps.pytest-timeout ps.pyyaml
              ps.nox ps.build ps.twine ps.packaging ps.pypiserver ps.editables
              ps.mkdocs-material
            ] ++ triton))
            pkgs.ruff
            pkgs.uv
            pkgs.gnumake
            pkgs.git
          ];
          # The local packages come from the working tree, editable, as with pip elsewhere; the venv lies in
          # .nox/ (git-ignored, so `make release` still sees a clean tree).
          shellHook = ''
            export PIP_DISABLE_PIP_VERSION_CHECK=1
            if [ ! -d .nox/nix-devshell ]; then
              python -m venv --system-site-packages .nox/nix-devshell
              .nox/nix-devshell/bin/pip install --quiet --no-deps --no-build-isolation \
                -e packages/retention-core -e packages/retention-kernels -e packages/retention-train
            fi
            source .nox/nix-devshell/bin/activate
          '';
        };
      });
}
