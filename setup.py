"Build fastslim from `settings.ini`, the one place its metadata and requirements are written."
from configparser import ConfigParser
from pathlib import Path
import setuptools

here = Path(__file__).parent
cfg = ConfigParser(delimiters=['='])
cfg.read(here/'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

def reqs(key): return cfg.get(key, '').split()

licenses = {'apache2': 'License :: OSI Approved :: Apache Software License'}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
min_py = cfg['min_python']
py_versions = [f'3.{i}' for i in range(int(min_py.split('.')[1]), 14)]

# `name`, `description`, `requires-python` and the URLs are static in pyproject.toml (nbdev reads them there);
# everything pyproject.toml declares `dynamic` comes from here.
setuptools.setup(
    version=cfg['version'],
    license=cfg['spdx_license'],
    author=cfg['author'], author_email=cfg['author_email'],
    keywords=cfg['keywords'].split(),
    classifiers=[f"Development Status :: {statuses[int(cfg['status'])-1]}", f"Intended Audience :: {cfg['audience']}",
                 f"Natural Language :: {cfg['language']}"] + [f'Programming Language :: Python :: {v}' for v in py_versions],
    long_description=(here/'README.md').read_text(encoding='utf-8'), long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path']+'.*']),
    include_package_data=True,
    install_requires=reqs('requirements'),
    extras_require={'dev': reqs('dev_requirements'), 'export': reqs('export_requirements'), 'dist': reqs('dist_requirements'), 'search': reqs('search_requirements'), 'bench': reqs('bench_requirements')},
    entry_points={'console_scripts': cfg['console_scripts'].split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
