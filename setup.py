from setuptools import find_packages, setup

setup(
    name="twisted-openai-forward",
    version="0.1.0",
    description="A Twisted daemon that forwards and streams OpenAI API traffic, with a shared key pool",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["fwd", "fwd.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["fwd_plugin.py"]},
    install_requires=[
        "twisted[tls,http2]>=24.7",
        "treq>=24.9",
        "attrs>=23.1",
        "service-identity>=24.1",
        "pyopenssl>=24.2",
        "prometheus-client>=0.20",
        "orjson>=3.9",
        "txredisapi>=1.4.10",
        "hiredis>=2.0",  # txredisapi parses replies with it when it is installed (C, from the Redis project)
        "autobahn>=24.4",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "openai[realtime]>=1.40", "redis>=5", "websockets>=13"],
    },
    entry_points={"console_scripts": ["openai-forward = fwd.cli:main"]},
    classifiers=["Framework :: Twisted", "Programming Language :: Python :: 3"],
)
